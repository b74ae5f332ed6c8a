"""Where a decode step's time goes on the GPU: torch.profiler over steady-state decode steps of
the Llama-3.1-8B shape (random weights), at a few batch sizes.

    python -m scripts.probes.profile_decode [--batches 1 64] [--steps 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.engine_gpu import hf_config, prompts
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine import Engine
from engine.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        hf_config(32).save_pretrained(directory)
        engine = Engine(
            EngineConfig(
                model=str(Path(directory)),
                dtype="bfloat16",
                device="cuda",
                load_format="dummy",
                max_model_len=4608,
                cache=CacheConfig(
                    num_blocks=max(4096, 24 * max(args.batches)), enable_prefix_caching=False
                ),
                scheduler=SchedulerConfig(
                    max_num_seqs=max(128, *args.batches), max_num_batched_tokens=8192
                ),
            )
        )
    for batch in args.batches:
        params = SamplingParams(max_tokens=64 + 2 * args.steps, temperature=0, ignore_eos=True)
        for p in prompts(batch, 128, 128256):
            engine.add_request(p, params)
        for _ in range(10):
            engine.step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / args.steps * 1e3
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            for _ in range(args.steps):
                engine.step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        gpu_total = sum(e.self_device_time_total for e in events) / args.steps / 1e3
        print(f"batch {batch}: wall {wall:.2f} ms/step, GPU busy {gpu_total:.2f} ms/step")
        print(
            events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60)
        )
        print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
        while engine.has_unfinished:
            engine.step()


if __name__ == "__main__":
    main()
