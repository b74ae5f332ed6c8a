"""pdmesh vs Hugging Face ``generate`` on one GPU, Llama-3.1-8B shape, random bf16 weights.

    python -m bench.engine_gpu [--batches 1 16 64 128] [--prompt-len 128] [--new-tokens 256]
                               [--layers 32] [--hf-batches 1 16 64] [--out results.json]

Both models hold the same random weights (Hugging Face's, loaded into pdmesh), decode greedily
with fixed lengths (pdmesh ``ignore_eos``; HF ``min_new_tokens``). Reported per batch size:
ms per decode step (pdmesh: steps timed alone; HF: (full run - 1-token run) / (new - 1)),
tokens/s and BLOOM-style ms per token = wall / (batch x new tokens), plus 4k-token prefill
TFLOP/s and greedy agreement between the two on the first prompts. Async scheduling is on
(the CUDA default); at ``--sync-batches`` the same engine also runs with it off, as the peer
the overlap is measured against.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.common import environment, write_json
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine import Engine
from engine.sampling_params import SamplingParams

DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# Llama-3.1 shapes: hidden size, MLP size, attention heads (8 KV heads in both), layers.
SHAPES = {"8b": (4096, 14336, 32, 32), "70b": (8192, 28672, 64, 80)}


def hf_config(layers: int | None = None, shape: str = "8b") -> Any:
    """A Llama-3.1 config of ``shape`` (its own layer count unless ``layers``)."""
    from transformers import LlamaConfig

    hidden, intermediate, heads, num_layers = SHAPES[shape]
    return LlamaConfig(  # type: ignore[call-arg]
        vocab_size=128256,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers or num_layers,
        num_attention_heads=heads,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        bos_token_id=None,
        eos_token_id=None,
    )


def shape_dir(shape: str, folder: Path) -> str:
    """A model directory of ``shape`` (config + synthetic tokenizer, dummy weights)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    config = smollm2_config() if shape == "135m" else hf_config(shape=shape)
    config.torch_dtype = "bfloat16"
    config.save_pretrained(str(folder))
    vocab = {f"w{i}": i for i in range(config.vocab_size)}  # every id decodes to a word
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(str(folder))
    return str(folder)


def smollm2_config() -> Any:
    """SmolLM2-135M's shape (the default model's), so a machine without its weights can
    measure the serving path's own ceiling with dummy weights."""
    from transformers import LlamaConfig

    return LlamaConfig(  # type: ignore[call-arg]
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip


def build_hf(layers: int) -> Any:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(hf_config(layers)).to(torch.bfloat16)  # type: ignore[arg-type]
    for param in model.parameters():  # spread logits so greedy choices are not near-ties
        param.data.normal_(0, 0.02)
    return model.eval()


def build_pdmesh(hf: Any, directory: Path, max_batch: int, num_blocks: int) -> Engine:
    hf.config.save_pretrained(str(directory))
    engine = Engine(
        EngineConfig(
            model=str(directory),
            dtype="bfloat16",
            device=DEVICE,
            load_format="dummy",
            max_model_len=4608,
            cache=CacheConfig(num_blocks=num_blocks, enable_prefix_caching=False),
            scheduler=SchedulerConfig(max_num_seqs=max_batch, max_num_batched_tokens=8192),
        )
    )
    engine.runner.model.load_weights(hf.state_dict().items())
    return engine


def prompts(batch: int, length: int, vocab: int, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator).tolist()


def run_pdmesh(engine: Engine, batch_prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    sync()
    start = time.perf_counter()
    for p in batch_prompts:
        engine.add_request(p, params)
    engine.step()  # prefill (all prompts fit one step's budget at these sizes)
    sync()
    decode_start = time.perf_counter()
    while engine.has_unfinished:
        engine.step()
    sync()
    end = time.perf_counter()
    # new_tokens - 1 decode forward passes follow the prefill (async scheduling adds one
    # short step at the end that only reads the last tokens back).
    return {"wall_s": end - start, "ms_per_step": (end - decode_start) / (new_tokens - 1) * 1e3}


def run_synchronous(
    engine: Engine, batch_prompts: list[list[int]], new_tokens: int
) -> dict[str, float]:
    """The same run with async scheduling off: the peer the overlap is measured against."""
    overlapping = engine.config
    engine.config = replace(overlapping, async_scheduling=False)
    try:
        return run_pdmesh(engine, batch_prompts, new_tokens)
    finally:
        engine.config = overlapping


def run_hf(hf: Any, batch_prompts: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(batch_prompts, device=DEVICE)
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    sync()
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - start


def greedy_agreement(engine: Engine, hf: Any, length: int, new_tokens: int) -> dict[str, Any]:
    """Tokens pdmesh and HF agree on before the first divergence, and whether each pdmesh
    token up to there sits in HF's top 5 (the vLLM criterion for bf16)."""
    batch_prompts = prompts(4, length, hf.config.vocab_size, seed=7)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in batch_prompts]
    ours: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished:
        for out in engine.step():
            ours[out.request_id] += out.new_token_ids
    rows = []
    for request_id, prompt in zip(ids, batch_prompts, strict=True):
        mine = ours[request_id]
        with torch.inference_mode():
            full = torch.tensor([prompt + mine], device=DEVICE)
            logits = hf(full).logits[0, len(prompt) - 1 : -1]  # HF's view of each next token
        top5 = logits.topk(5, dim=-1).indices.tolist()
        argmax = logits.argmax(-1).tolist()
        exact = next(
            (i for i, (a, b) in enumerate(zip(mine, argmax, strict=True)) if a != b), len(mine)
        )
        in_top5 = all(t in row for t, row in zip(mine, top5, strict=True))
        rows.append({"exact_prefix": exact, "all_in_hf_top5": in_top5})
    return {"new_tokens": new_tokens, "prompts": rows}


def prefill_tflops(engine: Engine, tokens: int, params_count: int, cfg: Any) -> dict[str, float]:
    prompt = prompts(1, tokens, cfg.vocab_size, seed=3)[0]
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    times = []
    for _ in range(3):
        engine.add_request(prompt, params)
        sync()
        start = time.perf_counter()
        engine.step()
        sync()
        times.append(time.perf_counter() - start)
    seconds = min(times)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    linear = 2 * params_count * tokens
    attention = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * tokens * tokens
    return {"tokens": tokens, "ms": seconds * 1e3, "tflops": (linear + attention) / seconds / 1e12}


def matmul_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    return 2 * 8192**3 * 10 / (time.perf_counter() - start) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 128])
    parser.add_argument("--hf-batches", type=int, nargs="*", default=[1, 16, 64, 128])
    parser.add_argument("--sync-batches", type=int, nargs="*", default=[1, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--out")
    parser.add_argument("--device", default="cuda", help="cpu only checks the script runs")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device

    hf = build_hf(args.layers)
    params_count = sum(p.numel() for n, p in hf.named_parameters() if "embed_tokens" not in n)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    max_batch = max(args.batches)
    blocks = max_batch * -(-(args.prompt_len + args.new_tokens) // 16) + 4096 // 16 + 64
    with tempfile.TemporaryDirectory() as directory:
        engine = build_pdmesh(hf, Path(directory), max_batch, blocks)
    peak = matmul_peak() if DEVICE == "cuda" else float("nan")
    result: dict[str, Any] = {
        **environment(),
        "model": "Llama-3.1-8B shape, random bf16",
        "async_scheduling": engine.config.overlaps_steps,
        "layers": args.layers,
        "weight_gb": weight_bytes / 1e9,
        "bf16_matmul_tflops": peak,
        "rows": [],
    }
    run_pdmesh(engine, prompts(2, 16, 1000), 4)  # warm-up (Triton compile)
    result["greedy_agreement"] = greedy_agreement(engine, hf, args.prompt_len, 32)
    print(json.dumps(result["greedy_agreement"]))
    print(
        f"{'batch':>5} {'ms/step':>8} {'tok/s':>9} {'ms/tok':>7} | {'HF ms/step':>10} "
        f"{'HF tok/s':>9} {'HF ms/tok':>9} | speedup"
    )
    for batch in args.batches:
        batch_prompts = prompts(batch, args.prompt_len, hf.config.vocab_size)
        run_pdmesh(engine, batch_prompts, 4)  # first use of this prefill size compiles kernels
        ours = run_pdmesh(engine, batch_prompts, args.new_tokens)
        total = batch * args.new_tokens
        row: dict[str, Any] = {
            "batch": batch,
            "ms_per_step": ours["ms_per_step"],
            "tokens_per_s": total / ours["wall_s"],
            "ms_per_token": ours["wall_s"] / total * 1e3,
        }
        if batch in args.sync_batches:
            synchronous = run_synchronous(engine, batch_prompts, args.new_tokens)
            row["sync_ms_per_step"] = synchronous["ms_per_step"]
            row["sync_tokens_per_s"] = total / synchronous["wall_s"]
        if batch in args.hf_batches:
            hf_wall = run_hf(hf, batch_prompts, args.new_tokens)
            hf_first = run_hf(hf, batch_prompts, 1)
            row.update(
                {
                    "hf_ms_per_step": (hf_wall - hf_first) / (args.new_tokens - 1) * 1e3,
                    "hf_tokens_per_s": total / hf_wall,
                    "hf_ms_per_token": hf_wall / total * 1e3,
                }
            )
            row["speedup_tokens_per_s"] = row["tokens_per_s"] / row["hf_tokens_per_s"]
        result["rows"].append(row)
        hf_part = (
            f"{row['hf_ms_per_step']:>10.2f} {row['hf_tokens_per_s']:>9.0f} "
            f"{row['hf_ms_per_token']:>9.3f} | {row['speedup_tokens_per_s']:.1f}x"
            if "hf_ms_per_step" in row
            else ""
        )
        sync_part = (
            f" | sync {row['sync_ms_per_step']:.2f} ms/step {row['sync_tokens_per_s']:.0f} tok/s"
            if "sync_ms_per_step" in row
            else ""
        )
        print(
            f"{batch:>5} {row['ms_per_step']:>8.2f} {row['tokens_per_s']:>9.0f} "
            f"{row['ms_per_token']:>7.3f} | {hf_part}{sync_part}",
            flush=True,
        )
    result["weight_read_limit_ms"] = weight_bytes / 3.0e12 * 1e3
    result["prefill_4k"] = prefill_tflops(engine, 4096, params_count, hf.config)
    result["prefill_4k"]["fraction_of_matmul_peak"] = result["prefill_4k"]["tflops"] / peak
    print(json.dumps(result["prefill_4k"]), f"peak {peak:.0f} TFLOP/s")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
