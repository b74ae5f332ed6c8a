"""Decode step time of a Llama-3.1 shape (random bf16 weights) with tensor parallelism on
one host, in one run.

    python -m bench.tp_gpu [--shape 8b|70b] [--tp 1 2] [--batches 1 64] [--steps 64]
                           [--tp-graphs] [--out results.json]

8B: each TP size is measured eagerly, TP=1 with CUDA graphs, and with ``--tp-graphs`` TP>1
with CUDA graphs too (NCCL all-reduces captured; the serving default). 70B (131 GiB of
weights: more than an H100 holds, nearly all of an H200): only the TP sizes asked for, with
CUDA graphs, plus the greedy tokens of one request as a check that it serves.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from typing import Any

import torch

from bench.common import environment, write_json
from bench.engine_gpu import hf_config, prompts
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine import Engine
from engine.sampling_params import SamplingParams


def decode_ms(engine: Engine, batch: int, steps: int) -> float:
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    for prompt in prompts(batch, 128, 128256):
        engine.add_request(prompt, params)
    for _ in range(4):  # prefill and a few decode steps of warm-up
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / steps * 1e3
    while engine.has_unfinished:
        engine.step()
    return elapsed


def engine_tokens(engine: Engine, prompt: list[int], params: SamplingParams) -> list[int]:
    request_id = engine.add_request(prompt, params)
    tokens: list[int] = []
    while engine.has_unfinished:
        tokens += [t for o in engine.step() if o.request_id == request_id for t in o.new_token_ids]
    return tokens


def measure(directory: str, tp: int, eager: bool, batches: list[int], steps: int) -> dict[str, Any]:
    torch.cuda.reset_peak_memory_stats()
    engine = Engine(
        EngineConfig(
            model=directory,
            dtype="bfloat16",
            device="cuda",
            load_format="dummy",
            max_model_len=1024,
            tensor_parallel_size=tp,
            enforce_eager=eager,
            cache=CacheConfig(num_blocks=8192, enable_prefix_caching=False),
            scheduler=SchedulerConfig(max_num_seqs=max(batches), max_num_batched_tokens=16384),
        )
    )
    try:
        row: dict[str, Any] = {
            "tp": tp,
            "cuda_graphs": not eager,
            "rank0_gib_after_load": torch.cuda.memory_allocated() / 2**30,
        }
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        row["greedy_tokens"] = engine_tokens(engine, prompts(1, 32, 128256)[0], params)
        for batch in batches:
            row[f"batch_{batch}_ms_per_step"] = decode_ms(engine, batch, steps)
        print(json.dumps(row), flush=True)
        return row
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=["8b", "70b"], default="8b")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--out")
    parser.add_argument(
        "--tp-graphs", action="store_true", help="also TP>1 with CUDA graphs (the default)"
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        hf_config(shape=args.shape).save_pretrained(directory)
        if args.shape == "70b":
            rows += [measure(directory, tp, False, args.batches, args.steps) for tp in args.tp]
        else:
            rows.append(measure(directory, 1, False, args.batches, args.steps))
        for tp in args.tp if args.shape == "8b" else []:
            rows.append(measure(directory, tp, True, args.batches, args.steps))
        if args.tp_graphs and args.shape == "8b":
            for tp in (t for t in args.tp if t > 1):
                rows.append(measure(directory, tp, False, args.batches, args.steps))
    scaling = {}
    for graphs in (True, False):
        by_tp = {r["tp"]: r for r in rows if r["cuda_graphs"] == graphs}
        if 1 in by_tp and 2 in by_tp:
            for batch in args.batches:
                key = f"batch_{batch}_ms_per_step"
                mode = "graphs" if graphs else "eager"
                scaling[f"batch_{batch}_tp2_speedup_{mode}"] = by_tp[1][key] / by_tp[2][key]
    print(json.dumps(scaling))
    write_json(
        args.out,
        {
            **environment(),
            "gpus": torch.cuda.device_count(),
            "shape": f"llama-3.1-{args.shape}, random bf16",
            "rows": rows,
            "scaling": scaling,
        },
    )


if __name__ == "__main__":
    main()
