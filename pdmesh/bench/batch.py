"""``pdmesh bench batch``: the BLOOM-inference table. For each batch size, generate
``--new-tokens`` tokens for every prompt of the batch with the engine directly (token ids: no
tokenizer needed) and report ms per token = wall time / (batch x new tokens), and the model's
load time. A batch that runs out of device memory is reported as OOM (and larger ones are not
tried); one that the KV cache cannot hold at once runs in waves and says so (fits_kv_cache).

    pdmesh bench batch --batch-sizes 1 2 4 8 16 32 64 128 --new-tokens 16
    pdmesh bench batch --device cuda --model /path/hf-dir --dtype bfloat16 --load-format dummy
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdmesh.bench.env import environment, write_json
from pdmesh.bench.workload import synthetic_prompt

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="HF model directory or .gguf (default: SmolLM2-135M)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--load-format", choices=["auto", "dummy"], default="auto")
    parser.add_argument("--max-model-len", type=int, help="default: input + new tokens")
    parser.add_argument("--kv-blocks", type=int, help="KV cache blocks (default: engine's)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCHES))
    parser.add_argument("--input-len", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help="tokens per step (default: the whole largest batch's prompts in one step)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON results file")


def is_oom(error: BaseException) -> bool:
    import torch

    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def run_batch(engine: Any, prompts: list[list[int]], new_tokens: int) -> float:
    """Wall seconds to generate ``new_tokens`` for every prompt (prefill included)."""
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    _sync(engine)
    start = time.perf_counter()
    counts = {engine.add_request(prompt, params): 0 for prompt in prompts}
    while engine.has_unfinished:
        for output in engine.step():
            counts[output.request_id] += len(output.new_token_ids)
    _sync(engine)
    elapsed = time.perf_counter() - start
    if set(counts.values()) != {new_tokens}:
        raise RuntimeError(f"outputs have the wrong lengths: {sorted(set(counts.values()))}")
    return elapsed


def _sync(engine: Any) -> None:
    import torch

    if engine.config.device.startswith("cuda"):
        torch.cuda.synchronize()


def _recover(engine: Any) -> None:
    """Ends whatever the failed batch left in the engine and returns its memory."""
    import torch

    for request_id in list(engine.requests):
        engine.abort(request_id)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def engine_config(args: argparse.Namespace) -> EngineConfig:
    largest = max(args.batch_sizes)
    return EngineConfig.from_env(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        load_format=args.load_format,
        max_model_len=args.max_model_len or args.input_len + args.new_tokens,
        # The largest batch runs as one batch: every prompt admitted in the first step.
        scheduler=SchedulerConfig(
            max_num_seqs=largest,
            max_num_batched_tokens=args.max_num_batched_tokens
            or max(2048, largest * args.input_len),
        ),
        cache=CacheConfig(num_blocks=args.kv_blocks),
    )


def main(args: argparse.Namespace) -> int:
    from engine.engine import Engine

    if min(args.batch_sizes) < 1 or args.input_len < 1 or args.new_tokens < 1:
        raise ValueError("batch sizes, --input-len and --new-tokens must be positive")
    config = engine_config(args)
    start = time.perf_counter()
    engine = Engine(config)
    _sync(engine)
    load_s = time.perf_counter() - start
    vocab = engine.model_config.vocab_size
    rng = random.Random(args.seed)
    blocks_per_request = engine.block_manager.blocks_needed(args.input_len + args.new_tokens)
    print(
        f"loaded {engine.source.path.name} in {load_s:.1f} s; {engine.runner.num_blocks} KV blocks"
    )
    run_batch(engine, [list(synthetic_prompt(rng, args.input_len, vocab))], 2)  # warm-up
    rows: list[dict[str, Any]] = []
    print(f"{'batch':>5} {'ms/token':>9} {'tok/s':>9} {'wall s':>7}")
    for batch in args.batch_sizes:
        if rows and rows[-1]["oom"]:
            rows.append({"batch": batch, "oom": True, "skipped": True})
            continue
        prompts = [list(synthetic_prompt(rng, args.input_len, vocab)) for _ in range(batch)]
        row: dict[str, Any] = {
            "batch": batch,
            # More requests than KV blocks hold run in waves, not as one batch.
            "fits_kv_cache": batch * blocks_per_request <= engine.runner.num_blocks,
        }
        try:
            # Untimed first: kernels tuned and graphs captured for this batch's shapes.
            run_batch(engine, prompts, 2)
            wall = run_batch(engine, prompts, args.new_tokens)
        except Exception as error:
            if not is_oom(error):
                raise
            _recover(engine)
            rows.append({**row, "oom": True, "error": str(error).splitlines()[0][:200]})
            print(f"{batch:>5} {'OOM':>9}")
            continue
        tokens = batch * args.new_tokens
        row.update(
            oom=False,
            wall_s=wall,
            ms_per_token=wall * 1e3 / tokens,
            tokens_per_s=tokens / wall,
        )
        rows.append(row)
        print(f"{batch:>5} {row['ms_per_token']:>9.2f} {row['tokens_per_s']:>9.1f} {wall:>7.2f}")
    write_json(
        args.out,
        {
            "benchmark": "batch",
            **environment(getattr(args, "argv", None)),
            "model": engine.source.path.name,
            "dtype": config.dtype,
            "load_format": config.load_format,
            "load_s": load_s,
            "num_kv_blocks": engine.runner.num_blocks,
            "input_len": args.input_len,
            "new_tokens": args.new_tokens,
            "results": rows,
        },
    )
    return 0
