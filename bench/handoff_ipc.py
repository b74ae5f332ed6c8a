"""Prefill -> decode hand-off between two processes of one host, as ``pdmesh serve prefill``
and ``pdmesh serve decode`` run them: a ``redis+shm`` store on a private redis-server, the
decode engine in a child process that maps the prefill's device arena through CUDA IPC.

    python -m bench.handoff_ipc [--device cuda] [--decode-device cuda:1]
                                [--lengths 1024 8192] [--lane-mib 2048 0] [--repeats 3]
                                [--out bench/results/handoff_ipc_h100.json]

Per prompt length and lane size (0: every block through the store's shared memory), timed
as in ``bench.handoff``: ``publish_s`` (the prefill's time handing blocks over),
``after_first_token_s`` (from the prefill's first token to the decode process holding the
whole prompt in its cache: its resume, by the system-wide monotonic clock both processes
read) and the overhead (publish + after first token) / prefill compute. The decode process
pulls every 2 ms while the prefill runs, as a decode worker does.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import statistics
import time
from multiprocessing.connection import Connection
from typing import Any

import torch

from bench.common import environment, write_json
from bench.handoff import DECODE, FIRST_ONLY, PULL_INTERVAL_S, engine_config, llama8b_dir, sync
from engine.config import EngineConfig
from engine.engine import Engine
from kvstore.factory import open_store
from kvstore.local_redis import start_redis, stop_redis


def decode_process(conn: Connection, config: EngineConfig, spec: str, capacity: int) -> None:
    """The decode worker: prefetch, pull until resumed, report when the prompt is in."""
    if config.device.startswith("cuda:"):
        torch.cuda.set_device(config.device)  # graphs and kernels on the worker's GPU
    engine = Engine(config, open_store(spec, capacity, namespace="bench"))
    conn.send("ready")
    while True:
        message = conn.recv()
        if message[0] == "stop":
            break
        _, prompt, request_id = message
        engine.prefetch(prompt, DECODE, request_id)
        while not conn.poll(PULL_INTERVAL_S):
            engine.prefetcher.pull()  # type: ignore[union-attr]
        _, token, hashes = conn.recv()
        received = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
        engine.resume(request_id, token, hashes)
        resumed = time.perf_counter()
        sync(config.device)
        done = time.perf_counter()
        kv = engine.kv
        assert kv is not None
        assert engine.requests[request_id].num_computed_tokens == len(prompt)
        engine.abort(request_id, retain=False)
        lane_blocks = kv.lane.num_filled_blocks if kv.lane else 0
        conn.send((received, resumed, done, kv.num_prefetched_blocks, lane_blocks))


class ProcessBench:
    """The prefill engine here, the decode engine in a child process on ``decode_device``."""

    def __init__(self, config: EngineConfig, spec: str, capacity: int, decode_device: str) -> None:
        self.prefill = Engine(config, open_store(spec, capacity, namespace="bench"), True)
        context = mp.get_context("spawn")
        self.conn, child = context.Pipe()
        decode_config = dataclasses.replace(config, device=decode_device)
        self.child = context.Process(
            target=decode_process, args=(child, decode_config, spec, capacity)
        )
        self.child.start()
        assert self.conn.recv() == "ready"
        self.count = 0

    def prompt(self, length: int) -> list[int]:
        self.count += 1
        generator = torch.Generator().manual_seed(1000 + self.count)
        vocab = self.prefill.model_config.vocab_size
        return torch.randint(10, vocab, (length,), generator=generator).tolist()

    def handoff(self, length: int) -> dict[str, float]:
        prompt, request_id = self.prompt(length), f"ipc-{self.count}"
        kv = self.prefill.kv
        assert kv is not None
        published_before = kv.publish_s
        self.conn.send(("prefetch", prompt, request_id))
        start = time.perf_counter()
        self.prefill.add_request(prompt, FIRST_ONLY, request_id)
        first = None
        while first is None:
            first = next((o for o in self.prefill.step() if o.finish_reason is not None), None)
        sync(self.prefill.config.device)
        first_token = time.perf_counter()
        self.conn.send(("resume", first.new_token_ids[0], first.kv_hashes))
        received, resumed, done, prefetched, lane_blocks = self.conn.recv()
        kv.store.release(request_id)
        publish = kv.publish_s - published_before
        return {
            "publish_s": publish,
            "after_first_token_s": done - first_token,
            # Its parts: the message reaching the decode process, its resume (lookups,
            # copies, store release), the wait for the device after it.
            "message_s": received - first_token,
            "resume_s": resumed - received,
            "device_wait_s": done - resumed,
            "prefill_compute_s": first_token - start - publish,
            "decode_prefetched_blocks_total": prefetched,
            "decode_lane_blocks_total": lane_blocks,
        }

    def close(self) -> None:
        self.conn.send(("stop",))
        self.child.join(timeout=60)
        self.prefill.shutdown()


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    process, url = start_redis()
    rows = []
    try:
        max_len = max(args.lengths) + 16
        capacity = 4 * (max_len // 16 + 32)
        for lane_mib in args.lane_mib:
            base = engine_config(args.device, max_len, args.chunk, llama8b_dir(args.layers))
            cache = dataclasses.replace(base.cache, handoff_lane_mib=lane_mib)
            config = dataclasses.replace(base, cache=cache)
            spec = url.replace("redis", "redis+shm", 1)
            bench = ProcessBench(config, spec, capacity, args.decode_device or args.device)
            try:
                bench.handoff(min(256, *args.lengths))  # warm-up
                for length in args.lengths:
                    runs = [bench.handoff(length) for _ in range(args.repeats)]
                    row: dict[str, Any] = {"lane_mib": lane_mib, "prompt_tokens": length}
                    row.update({k: statistics.median(r[k] for r in runs) for k in runs[0]})
                    row["overhead"] = (row["publish_s"] + row["after_first_token_s"]) / row[
                        "prefill_compute_s"
                    ]
                    rows.append(row)
                    print(
                        f"lane {lane_mib:5d} MiB {length:5d} tokens: prefill "
                        f"{row['prefill_compute_s'] * 1e3:7.1f} ms, publish "
                        f"{row['publish_s'] * 1e3:6.1f} ms, after first token "
                        f"{row['after_first_token_s'] * 1e3:6.1f} ms: "
                        f"overhead {row['overhead']:6.1%}",
                        flush=True,
                    )
            finally:
                bench.close()
    finally:
        stop_redis(process)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--lane-mib", type=int, nargs="+", default=[2048, 0])
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument(
        "--decode-device", help="the decode process's device, e.g. cuda:1 (default: --device)"
    )
    parser.add_argument("--layers", type=int, default=32, help="of the Llama-8B shape")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = run(args)
    write_json(
        args.out,
        {
            **environment(),
            "model": f"llama-3.1-8b shape ({args.layers} layers), random bf16",
            "store": "redis+shm, decode engine in another process",
            "prefill_device": args.device,
            "decode_device": args.decode_device or args.device,
            "prefill_chunk_tokens": args.chunk,
            "repeats": args.repeats,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
