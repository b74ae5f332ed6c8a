"""Prefill -> decode hand-off overhead, as a fraction of the prefill's own time, on one host.

    python -m bench.handoff [--device cpu|cuda] [--lengths 1024 7168] [--stores embedded
                            redis+shm] [--lane-mib 2048 0] [--repeats 2]
                            [--out bench/results/handoff_cpu.json]

Two engines in this process share a store, as in ``pdmesh up``: a prefill engine (which
publishes each chunk's blocks) and a decode engine. Fresh random prompts every time (no
prefix cache helps). Timed:

- ``prefill_s``: the prefill engine alone, publishing off: start to first token;
- ``publish_s``: the prefill's time reading blocks out into the store (on its critical path);
- pipelined: the decode engine reserves blocks at the start and pulls each chunk's blocks
  while the prefill computes the next (``engine.prefetch``, polled every 2 ms as a decode
  worker does); ``pipelined_after_first_token_s`` is what is left after the first token
  (``engine.resume``): the last chunk's blocks;
- sequential: ``sequential_copy_s``, a full copy of every block after the first token (what a
  decode worker does that starts only then);
- with a device lane (``--lane-mib``, default on cuda): the prefill publishes into its lane
  and the decode engine copies device to device (``kvstore.device_lane``); 0 compares the
  host path in the same run. Lane rows also time a finished request's retention on the
  decode engine (``request_with_retention_*``): its blocks written to the store at once, or
  by the host publisher's thread (``engine.host_publisher``).

The hand-off overhead is its time on the critical path over the prefill's: (publish + copy
left after the first token) / (the same run's prefill time without publishing), timed
directly so a noisy host does not drown it; ``pipelined_wall_overhead`` is the end-to-end
wall-clock version against the separate prefill-alone run (it also counts any slowdown of
the prefill by the concurrent pulls, and any change in the host's load between the runs).
``redis+shm`` starts a private redis-server (skipped where there is none). CPU: the default
model (SmolLM2-135M, 8192 positions: the long prompt is 7168 tokens), 512-token chunks.
``--device cuda``: a Llama-3.1-8B-shaped model with random bf16 weights
(``load_format="dummy"``), 8192-token prompts, 2048-token chunks.
"""

from __future__ import annotations

import argparse
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
from engine.host_publisher import HostPublisher
from engine.kv_transfer import KVTransfer
from engine.lane_transfer import open_lane
from engine.prefetch import Prefetcher
from engine.sampling_params import SamplingParams
from kvstore.base import KVStore
from kvstore.embedded import EmbeddedKVStore
from kvstore.local_redis import start_redis, stop_redis

FIRST_ONLY = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
DECODE = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
STORES = ("embedded", "redis", "redis+shm")
PULL_INTERVAL_S = 0.002  # the decode worker's idle poll (engine.core.process)


def engine_config(device: str, max_len: int, chunk: int, model_dir: str | None) -> EngineConfig:
    num_blocks = 2 * (max_len // 16) + 32  # the decode engine holds two copies
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


def llama8b_dir(layers: int) -> str:
    from bench.engine_gpu import hf_config

    directory = Path(tempfile.mkdtemp(prefix="handoff-llama8b-"))
    hf_config(layers).save_pretrained(str(directory))
    return str(directory)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Bench:
    """A prefill and a decode engine; ``use_store`` joins them through another store."""

    def __init__(self, config: EngineConfig, device: str) -> None:
        self.prefill = Engine(config, EmbeddedKVStore(1), publish_kv=True)
        self.decode = Engine(config, EmbeddedKVStore(1))
        self.device = device
        self.vocab = self.prefill.model_config.vocab_size
        self.count = 0

    def use_store(self, store: KVStore, lane_mib: int) -> KVTransfer:
        """Joins the engines through ``store``, and through a device lane of ``lane_mib``
        (0: none, every block through the store)."""
        namespace = self.prefill.block_manager.namespace
        for engine in (self.prefill, self.decode):
            if engine.kv is not None and engine.kv.lane is not None:
                engine.kv.lane.close()
            if engine.kv is not None and engine.kv.publisher is not None:
                engine.kv.publisher.close()
            lane = open_lane(store, engine.runner, lane_mib, engine is self.prefill)
            engine.kv = KVTransfer(store, engine.runner, namespace, lane)
        decode = self.decode
        assert decode.kv is not None
        decode.prefetcher = Prefetcher(decode.kv, decode.block_manager, decode.scheduler)
        return decode.kv

    def retention(self, length: int) -> dict[str, float]:
        """A request of ``length`` prompt tokens run to the end on the decode engine, whose
        finish leaves every block in the store: timed with the blocks written at once, and
        with the host publisher (the engine's thread only gathers them; ``flush`` waits for
        the publisher's copy to the store)."""
        kv = self.decode.kv
        assert kv is not None
        row = {}
        for name, publisher in (
            ("at_once", None),
            ("host_publisher", HostPublisher(kv.store, self.decode.runner.device, 2 << 30)),
        ):
            kv.publisher = publisher
            start = time.perf_counter()
            self.decode.add_request(self.prompt(length), FIRST_ONLY, f"retain-{self.count}")
            while self.decode.has_unfinished:
                self.decode.step()
            sync(self.device)
            row[f"request_with_retention_{name}_s"] = time.perf_counter() - start
            if publisher is not None:
                publisher.close()
                row["host_publisher_done_s"] = time.perf_counter() - start
        kv.publisher = None
        return row

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
        """The prefill with no store at all (with one but not publishing, the engine would
        keep the finished request's blocks in it)."""
        kv, self.prefill.kv, self.prefill.publish_kv = self.prefill.kv, None, False
        try:
            start = time.perf_counter()
            self.run_prefill(self.prompt(length), f"alone-{self.count}")
            return time.perf_counter() - start
        finally:
            self.prefill.kv, self.prefill.publish_kv = kv, True

    def handoff(self, length: int) -> dict[str, float]:
        """One prefill that publishes; the decode engine pulls its blocks while it runs
        (pipelined) and, after the first token, copies all of them again into a second
        request (sequential: what a decode worker does that starts after the prefill)."""
        prompt, request_id = self.prompt(length), f"h-{self.count}"
        prefill_kv, decode = self.prefill.kv, self.decode
        assert prefill_kv is not None and decode.kv is not None
        pulled_before, published_before = decode.kv.num_prefetched_blocks, prefill_kv.publish_s
        done = threading.Event()

        def puller() -> None:  # the decode worker's loop while it waits for the first token
            while not done.is_set():
                try:
                    decode.prefetcher.pull()  # type: ignore[union-attr]
                except Exception:  # a failed pull leaves the blocks to the resume
                    traceback.print_exc()
                    return
                done.wait(PULL_INTERVAL_S)

        start = time.perf_counter()
        decode.prefetch(prompt, DECODE, request_id)
        thread = threading.Thread(target=puller)
        thread.start()
        first = self.run_prefill(prompt, request_id)
        first_token = time.perf_counter()
        done.set()
        thread.join()
        decode.resume(request_id, first.new_token_ids[0], first.kv_hashes)
        sync(self.device)
        pipelined_end = time.perf_counter()
        pulled = decode.kv.num_prefetched_blocks - pulled_before
        decode.prefetch(prompt, DECODE, "copy")  # everything is there: one full copy
        decode.resume("copy", first.new_token_ids[0], first.kv_hashes)
        sync(self.device)
        copy_s = time.perf_counter() - pipelined_end
        for rid in (request_id, "copy"):
            assert decode.requests[rid].num_computed_tokens == length, "whole prompt in cache"
            decode.abort(rid, retain=False)
        prefill_kv.store.release(request_id)
        return {
            "prefill_with_publish_s": first_token - start,
            "publish_s": prefill_kv.publish_s - published_before,
            "pipelined_after_first_token_s": pipelined_end - first_token,
            "sequential_copy_s": copy_s,
            "blocks_pulled_during_prefill": pulled,
        }


def measure(
    bench: Bench, length: int, alone: float, repeats: int, retention: bool = False
) -> dict[str, Any]:
    bench.handoff(min(length, 256))  # warm-up
    runs = [bench.handoff(length) for _ in range(repeats)]
    row: dict[str, Any] = {"prompt_tokens": length, "num_blocks": -(-length // 16)}
    row.update({key: statistics.median(r[key] for r in runs) for key in runs[0]})
    row["prefill_s"] = alone
    if retention:
        row.update(bench.retention(length))
    # The hand-off's share of the critical path, timed directly: publishing on the prefill's
    # side plus the copying left after the first token, over the same run's prefill compute
    # (a separate run's time swings with the host's load; both are recorded).
    compute = row["prefill_with_publish_s"] - row["publish_s"]
    row["sequential_overhead"] = (row["publish_s"] + row["sequential_copy_s"]) / compute
    row["pipelined_overhead"] = (row["publish_s"] + row["pipelined_after_first_token_s"]) / compute
    # End to end, wall clock against the prefill-alone run (includes any slowdown of the
    # prefill by the concurrent pulls, and the host's load swings between the two runs).
    row["pipelined_wall_overhead"] = (
        row["prefill_with_publish_s"] + row["pipelined_after_first_token_s"]
    ) / alone - 1
    return row


def start_store(name: str, capacity: int) -> tuple[KVStore, Any]:
    """``embedded``, or ``redis`` / ``redis+shm`` on a private redis-server."""
    if name == "embedded":
        return EmbeddedKVStore(capacity), None
    from kvstore.factory import open_store  # redis-py only where Redis is used

    process, url = start_redis()
    return open_store(url.replace("redis", name, 1), capacity, namespace="bench"), process


def run(args: argparse.Namespace) -> dict[str, Any]:
    dummy = args.device == "cuda" or args.dummy
    model_dir = llama8b_dir(args.layers) if dummy else None
    max_len = max(args.lengths) + 16
    bench = Bench(engine_config(args.device, max_len, args.chunk, model_dir), args.device)
    bench.prefill_alone(min(min(args.lengths), 256))  # warm-up
    alone = {
        n: statistics.median(bench.prefill_alone(n) for _ in range(args.repeats))
        for n in args.lengths
    }
    results = []
    for name in args.stores:
        if name != "embedded" and shutil.which("redis-server") is None:
            print(f"{name}: no redis-server here, skipped")
            continue
        store, process = start_store(name, 4 * (max_len // 16 + 32))
        try:
            for lane_mib in args.lane_mib:
                kv = bench.use_store(store, lane_mib)
                prefill_kv = bench.prefill.kv
                path = "device-lane" if prefill_kv and prefill_kv.lane else kv.path
                for length in args.lengths:
                    row = {
                        "store": name,
                        "path": path,
                        "lane_mib": lane_mib,
                        **measure(bench, length, alone[length], args.repeats, lane_mib > 0),
                    }
                    results.append(row)
                    report(row)
        finally:
            store.close()
            if process is not None:
                stop_redis(process)
    return {
        "model": f"llama-3.1-8b shape ({args.layers} layers), random bf16"
        if model_dir
        else "SmolLM2-135M float32",
        "prefill_chunk_tokens": args.chunk,
        "repeats": args.repeats,
        "rows": results,
    }


def report(row: dict[str, Any]) -> None:
    print(
        f"{row['store']:10s} {row['path']:12s} {row['prompt_tokens']:5d} tokens: "
        f"prefill {row['prefill_s'] * 1e3:8.1f} ms; "
        f"hand-off sequential {row['sequential_overhead']:6.1%}, "
        f"pipelined {row['pipelined_overhead']:6.1%} "
        f"(wall {row['pipelined_wall_overhead']:+6.1%}; "
        f"{row['blocks_pulled_during_prefill']} of {row['num_blocks']} blocks "
        "pulled during the prefill)",
        flush=True,
    )
    if "request_with_retention_at_once_s" in row:
        print(
            f"{'':23s} finished request's retention on the decode engine: request "
            f"{row['request_with_retention_at_once_s'] * 1e3:8.1f} ms writing at once, "
            f"{row['request_with_retention_host_publisher_s'] * 1e3:8.1f} ms with the host "
            f"publisher (in the store after {row['host_publisher_done_s'] * 1e3:8.1f} ms)",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument(
        "--stores", nargs="+", default=["embedded", "redis+shm"], choices=STORES, metavar="STORE"
    )
    parser.add_argument(
        "--chunk", type=int, help="prefill tokens per iteration (default: cpu 512, cuda 2048)"
    )
    parser.add_argument(
        "--lane-mib",
        type=int,
        nargs="+",
        help="device lane sizes to compare, 0 = through the store (default: cuda 2048 0, cpu 0)",
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dummy", action="store_true", help="the Llama-8B shape on the CPU too")
    parser.add_argument("--layers", type=int, default=32, help="of the Llama-8B shape")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.chunk is None:
        args.chunk = 2048 if args.device == "cuda" else 512
    if args.lane_mib is None:
        args.lane_mib = [2048, 0] if args.device == "cuda" else [0]
    if args.lengths is None:
        args.lengths = [1024, 8192] if args.device == "cuda" else [1024, 7168]
    result = run(args)
    write_json(args.out, {**environment(), **result})


if __name__ == "__main__":
    main()
