"""Decode step time of the Llama-3.1-8B shape (random bf16 weights) with tensor parallelism
1 and 2 on one host, in one run.

    python -m bench.tp_gpu [--tp 1 2] [--batches 1 64] [--steps 64] [--out results.json]

Each TP size is measured eagerly, TP=1 with CUDA graphs, and with ``--tp-graphs`` TP>1 with
CUDA graphs too (NCCL all-reduces captured; the serving default).
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


def measure(directory: str, tp: int, eager: bool, batches: list[int], steps: int) -> dict[str, Any]:
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
        row: dict[str, Any] = {"tp": tp, "cuda_graphs": not eager}
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
        hf_config(32).save_pretrained(directory)
        rows.append(measure(directory, 1, False, args.batches, args.steps))
        for tp in args.tp:
            rows.append(measure(directory, tp, True, args.batches, args.steps))
        if args.tp_graphs:
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
        {**environment(), "gpus": torch.cuda.device_count(), "rows": rows, "scaling": scaling},
    )


if __name__ == "__main__":
    main()
