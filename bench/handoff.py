"""Prefill -> decode hand-off overhead, as a fraction of the prefill's own time, on one host.

    python -m bench.handoff [--device cpu|cuda] [--lengths 1024 7168] [--stores embedded
                            redis+shm] [--repeats 2] [--out bench/results/handoff_cpu.json]

Two engines in this process share a store, as in ``pdmesh up``: a prefill engine (which
publishes each chunk's blocks) and a decode engine. Timed per prompt, with fresh random
prompts every time (no prefix cache helps):

- ``prefill``: the prefill engine alone, store publishing off: start to first token;
- ``sequential``: prefill with publishing, then the decode engine copies every block into its
  paged cache (what a decode worker does when it starts after the first token);
- ``pipelined``: the decode engine reserves blocks at the start and a thread pulls each
  chunk's blocks while the prefill computes the next (``engine.prefetch``); after the first
  token only the last chunk's blocks are left (``engine.resume``).

Both hand-offs end when the decode engine holds the whole prompt's KV and could decode.
Overhead = (hand-off total - prefill) / prefill. ``redis+shm`` starts a private
redis-server (skipped where there is none). CPU: the default model (SmolLM2-135M, 8192
positions: the long prompt is 7168 tokens). ``--device cuda``: a Llama-3.1-8B-shaped model
with random bf16 weights (``load_format="dummy"``), 8192-token prompts fit.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from bench.common import environment, write_json
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine import Engine
from engine.sampling_params import SamplingParams
from kvstore.base import KVStore
from kvstore.embedded import EmbeddedKVStore

FIRST_ONLY = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
DECODE = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
STORES = ("embedded", "redis", "redis+shm")
PULL_INTERVAL_S = 0.002  # the decode worker's idle poll (engine.async_engine)


def engine_config(device: str, max_len: int, chunk: int, model_dir: str | None) -> EngineConfig:
    num_blocks = max_len // 16 + 32
    common: dict[str, Any] = {
        "device": device,
        "cache": CacheConfig(num_blocks=num_blocks, enable_prefix_caching=False),
        "scheduler": SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=chunk),
    }
    if model_dir is None:  # the default model
        return EngineConfig(**common)
    return EngineConfig(
        model=model_dir, dtype="bfloat16", load_format="dummy", max_model_len=max_len, **common
    )


def llama8b_dir() -> str:
    from bench.engine_gpu import hf_config

    directory = Path(tempfile.mkdtemp(prefix="handoff-llama8b-"))
    hf_config(32).save_pretrained(str(directory))
    return str(directory)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Bench:
    def __init__(self, prefill: Engine, decode: Engine, device: str) -> None:
        self.prefill = prefill
        self.decode = decode
        self.device = device
        self.vocab = prefill.model_config.vocab_size
        self.count = 0

    def prompt(self, length: int) -> list[int]:
        self.count += 1
        generator = torch.Generator().manual_seed(self.count)
        return torch.randint(10, self.vocab, (length,), generator=generator).tolist()

    def run_prefill(self, prompt: list[int], request_id: str) -> Any:
        self.prefill.add_request(prompt, FIRST_ONLY, request_id)
        while True:
            for output in self.prefill.step():
                if output.finish_reason is not None:
                    sync(self.device)
                    return output

    def prefill_alone(self, length: int) -> float:
        self.prefill.publish_kv = False
        try:
            start = time.perf_counter()
            self.run_prefill(self.prompt(length), f"alone-{self.count}")
            return time.perf_counter() - start
        finally:
            self.prefill.publish_kv = True

    def sequential(self, length: int) -> float:
        prompt, request_id = self.prompt(length), f"seq-{self.count}"
        start = time.perf_counter()
        first = self.run_prefill(prompt, request_id)
        self.decode.prefetch(prompt, DECODE, request_id)  # everything is there: one copy
        self.decode.resume(request_id, first.new_token_ids[0], first.kv_hashes)
        sync(self.device)
        elapsed = time.perf_counter() - start
        self._check_and_free(request_id, length)
        return elapsed

    def pipelined(self, length: int) -> tuple[float, int]:
        prompt, request_id = self.prompt(length), f"pipe-{self.count}"
        kv = self.decode.kv
        assert kv is not None and self.decode.prefetcher is not None
        before = kv.num_prefetched_blocks
        done = threading.Event()

        def puller() -> None:  # the decode worker's loop while it waits for the first token
            while not done.is_set():
                try:
                    self.decode.prefetcher.pull()  # type: ignore[union-attr]
                except Exception:  # a failed pull leaves the blocks to the resume
                    traceback.print_exc()
                    return
                done.wait(PULL_INTERVAL_S)

        start = time.perf_counter()
        self.decode.prefetch(prompt, DECODE, request_id)
        thread = threading.Thread(target=puller)
        thread.start()
        first = self.run_prefill(prompt, request_id)
        done.set()
        thread.join()
        self.decode.resume(request_id, first.new_token_ids[0], first.kv_hashes)
        sync(self.device)
        elapsed = time.perf_counter() - start
        self._check_and_free(request_id, length)
        return elapsed, kv.num_prefetched_blocks - before

    def _check_and_free(self, request_id: str, length: int) -> None:
        seq = self.decode.requests[request_id]
        assert seq.num_computed_tokens == length, "the decode cache holds the whole prompt"
        self.decode.abort(request_id, retain=False)
        self.prefill.kv.store.release(request_id)  # type: ignore[union-attr]


def measure(bench: Bench, length: int, repeats: int) -> dict[str, Any]:
    alone, sequential, pipelined, pulled = [], [], [], []
    bench.prefill_alone(min(length, 256))  # warm-up, both engines
    bench.sequential(min(length, 256))
    for _ in range(repeats):
        alone.append(bench.prefill_alone(length))
        sequential.append(bench.sequential(length))
        elapsed, num_pulled = bench.pipelined(length)
        pipelined.append(elapsed)
        pulled.append(num_pulled)
    base = statistics.median(alone)
    row = {
        "prompt_tokens": length,
        "num_blocks": -(-length // 16),
        "prefill_s": base,
        "sequential_s": statistics.median(sequential),
        "pipelined_s": statistics.median(pipelined),
        "blocks_pulled_during_prefill": statistics.median(pulled),
    }
    row["sequential_overhead"] = row["sequential_s"] / base - 1
    row["pipelined_overhead"] = row["pipelined_s"] / base - 1
    return row


def start_store(name: str, capacity: int) -> tuple[KVStore, Any]:
    """``embedded``, or ``redis`` / ``redis+shm`` on a private redis-server."""
    if name == "embedded":
        return EmbeddedKVStore(capacity), None
    from kvstore.factory import open_store  # redis-py only where Redis is used
    from pdmesh.launch import start_local_redis

    process, url = start_local_redis()
    return open_store(url.replace("redis", name, 1), capacity, namespace="bench"), process


def run(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = llama8b_dir() if args.device == "cuda" else None
    max_len = max(args.lengths) + 16
    config = engine_config(args.device, max_len, args.chunk, model_dir)
    results = []
    for spec in args.stores:
        if spec != "embedded" and shutil.which("redis-server") is None:
            print(f"{spec}: no redis-server here, skipped")
            continue
        store, process = start_store(spec, 3 * (max_len // 16 + 32))
        try:
            prefill, decode = Engine(config, store, True), Engine(config, store)
            bench = Bench(prefill, decode, args.device)
            assert decode.kv is not None
            for length in args.lengths:
                row = {
                    "store": spec,
                    "path": decode.kv.path,
                    **measure(bench, length, args.repeats),
                }
                results.append(row)
                print(
                    f"{spec:10s} {length:5d} tokens: prefill {row['prefill_s'] * 1e3:8.1f} ms, "
                    f"+hand-off sequential {row['sequential_overhead']:+6.1%}, "
                    f"pipelined {row['pipelined_overhead']:+6.1%} "
                    f"({row['blocks_pulled_during_prefill']} of {row['num_blocks']} blocks "
                    "pulled during the prefill)"
                )
            del prefill, decode, bench
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
        finally:
            store.close()
            if process is not None:
                process.terminate()
                process.wait(timeout=10)
    return {
        "model": "llama-3.1-8b shape, random bf16" if model_dir else "SmolLM2-135M float32",
        "prefill_chunk_tokens": args.chunk,
        "repeats": args.repeats,
        "rows": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument(
        "--stores", nargs="+", default=["embedded", "redis+shm"], choices=STORES, metavar="STORE"
    )
    parser.add_argument("--chunk", type=int, default=2048, help="prefill tokens per iteration")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.lengths is None:
        args.lengths = [1024, 8192] if args.device == "cuda" else [1024, 7168]
    result = run(args)
    write_json(args.out, {**environment(), **result})


if __name__ == "__main__":
    main()
