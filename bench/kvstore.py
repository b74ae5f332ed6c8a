"""KV store data paths: GB/s of each path next to the copy limits measured in the same run.

    python -m bench.kvstore --out bench/results/kvstore_cpu.json
    python -m bench.kvstore --device cuda --out $OUT/kvstore_gpu.json

Host paths: the embedded store (same process: ``get`` hands back the stored ``bytes``
objects, no copy), POSIX shared memory (raw segments, and the Redis-indexed store on them),
block bytes in Redis, the peer-to-peer plane (a reader on "another host" streaming blocks
over gRPC from the writer's block server, here over loopback), the disk tier (raw block
files, and a tiered store whose put demotes and whose get promotes). The limits: one large
``memcpy``, and a per-block copy into new ``bytes`` (what any path that hands out fresh
bytes must pay at least). With ``--device
cuda`` also: store bytes to device through pageable memory and through pinned staging rows,
device to store bytes, the copy engine's limit (one large pinned copy each way), a device
copy, and CUDA IPC (a second process copying out of this one's device memory).

Redis paths need a ``redis-server`` on PATH (or ``--redis-url``); without one they are
skipped and the JSON says so. Disk numbers go through the page cache (files just written):
they show the tier's software cost, not the NVMe's.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from bench.common import environment, write_json
from kvstore import shm
from kvstore.block_hash import BlockHash, block_hash
from kvstore.disk_tier import DiskFilePlane
from kvstore.factory import open_store
from kvstore.gpu_paths import (
    PinnedStaging,
    cuda_ipc_available,
    export_cuda_tensor,
    import_cuda_tensor,
)

Blocks = list[tuple[BlockHash, bytes]]
# One timed run: setup (untimed) returns the timed callable.
Setup = Callable[[], Callable[[], object]]


class Bench:
    def __init__(self, block_bytes: int, num_blocks: int, repeats: int) -> None:
        self.block_bytes = block_bytes
        self.num_blocks = num_blocks
        self.repeats = repeats
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        rows = torch.randint(0, 256, (num_blocks, block_bytes), dtype=torch.uint8)
        self.payloads = [row.numpy().tobytes() for row in rows]

    @property
    def total_bytes(self) -> int:
        return self.block_bytes * self.num_blocks

    def fresh_blocks(self) -> Blocks:
        """The same bytes under new names, so every put stores (a put of stored blocks
        only pins)."""
        salt = uuid.uuid4().bytes
        return [(block_hash(None, [i], salt), data) for i, data in enumerate(self.payloads)]

    def measure(self, path: str, op: str, setup: Setup, sync: Callable[[], None] = lambda: None,
                note: str = "") -> None:  # fmt: skip
        seconds = []
        for _ in range(self.repeats):
            timed = setup()
            sync()
            start = time.perf_counter()
            timed()
            sync()
            seconds.append(time.perf_counter() - start)
        median = statistics.median(seconds)
        row = {
            "path": path,
            "op": op,
            "gbps": self.total_bytes / median / 1e9,
            "gbps_best": self.total_bytes / min(seconds) / 1e9,
            "ms_median": median * 1e3,
            "note": note,
        }
        self.rows.append(row)
        print(f"{path:>22} {op:<28} {row['gbps']:9.2f} GB/s (best {row['gbps_best']:.2f})"
              f"  {note}", flush=True)  # fmt: skip


def host_limits(bench: Bench, when: str) -> None:
    """The host copy limits; measured at the start and again at the end of the run, so a
    busy machine shows as a spread between the two."""
    source = bytearray(b"".join(bench.payloads))
    target = bytearray(len(source))

    def one_memcpy() -> Callable[[], object]:
        def run() -> None:
            memoryview(target)[:] = source

        return run

    bench.measure("limit", f"memcpy, one buffer ({when})", one_memcpy)
    bench.measure(
        "limit", f"memcpy per block to new bytes ({when})", lambda: lambda: _copy_each(bench)
    )


def _copy_each(bench: Bench) -> list[bytes]:
    # bytes(memoryview) allocates and copies, like any path that hands out new bytes.
    return [bytes(memoryview(p)) for p in bench.payloads]


def store_paths(bench: Bench, name: str, spec: str, note: str = "") -> None:
    """put and get of every block through a store opened from ``spec``."""
    with _opened(spec, bench.num_blocks) as store:
        state: dict[str, Blocks] = {}

        def setup_put() -> Callable[[], object]:
            store.release("writer")
            state["blocks"] = bench.fresh_blocks()
            return lambda: store.put("writer", state["blocks"])

        bench.measure(name, "put", setup_put, note=note)
        hashes = [h for h, _ in state["blocks"]]

        def setup_get() -> Callable[[], object]:
            store.release("reader")
            return lambda: store.get("reader", hashes)

        bench.measure(name, "get", setup_get, note=note)
        got = store.get("check", hashes)
        assert got == [d for _, d in state["blocks"]], f"{name} returned wrong bytes"
        if name == "embedded":
            same = all(g is d for g, (_, d) in zip(got, state["blocks"], strict=True))
            bench.notes.append(f"embedded get returns the stored objects themselves: {same}")


def tier_paths(bench: Bench, name: str, spec: str) -> None:
    """A put that demotes every block it displaces to disk, and a get that promotes every
    block it reads back from disk (swapping the others down)."""
    spec = f"{spec}{'&' if '?' in spec else '?'}disk_blocks={bench.num_blocks}"
    with _opened(spec, bench.num_blocks) as store:
        state: dict[str, Blocks] = {}

        def setup_demoting_put() -> Callable[[], object]:
            for owner in ("first", "second", "reader"):
                store.release(owner)
            state["first"] = bench.fresh_blocks()
            store.put("first", state["first"])
            store.release("first")
            return lambda: store.put("second", bench.fresh_blocks())

        bench.measure(name, "put demoting as many to disk", setup_demoting_put)

        def setup_promoting_get() -> Callable[[], object]:
            setup_demoting_put()()
            store.release("second")
            hashes = [h for h, _ in state["first"]]
            return lambda: store.get("reader", hashes)

        bench.measure(name, "get promoting from disk", setup_promoting_get)
        metrics = store.metrics()
        assert metrics.promotions > 0 and metrics.demotions > 0


def p2p_paths(bench: Bench, host_port_db: str) -> None:
    """A reader that is another host to the writer (it names the machine differently), so
    every get streams the blocks over gRPC from the writer's block server (loopback TCP)."""
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    base = f"redis+p2p://{host_port_db}"
    writer = open_store(f"{base}?peer_host=127.0.0.1", bench.num_blocks, namespace=namespace)
    reader = open_store(f"{base}?peer_host=localhost", bench.num_blocks, namespace=namespace)
    try:
        written = bench.fresh_blocks()
        writer.put("writer", written)
        hashes = [h for h, _ in written]

        def setup_get() -> Callable[[], object]:
            reader.release("reader")
            return lambda: reader.get("reader", hashes)

        bench.measure("redis+p2p store", "get from another host", setup_get, note="loopback")
        assert reader.get("check", hashes) == [d for _, d in written]
    finally:
        reader.close()
        writer.close()


def raw_planes(bench: Bench, disk_dir: Path) -> None:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    names: list[str] = []

    def setup_shm_write() -> Callable[[], object]:
        for name in names:
            shm.unlink_segment(name)
        names.clear()
        names.extend(shm.new_segment_name(namespace, f"{i:x}") for i in range(bench.num_blocks))

        def run() -> None:
            for name, data in zip(names, bench.payloads, strict=True):
                shm.create_segment(name, data)

        return run

    bench.measure("shm segments", "write", setup_shm_write)
    bench.measure(
        "shm segments",
        "read",
        lambda: lambda: [shm.read_segment(n, bench.block_bytes) for n in names],
    )
    for name in names:
        shm.unlink_segment(name)

    plane = DiskFilePlane(disk_dir / "raw", namespace)
    payloads: list[bytes] = []

    def setup_disk_write() -> Callable[[], object]:
        plane.discard(payloads)
        payloads.clear()

        def run() -> None:
            payloads.extend(plane.write(f"{i:x}", d) for i, d in enumerate(bench.payloads))

        return run

    bench.measure("disk files", "write", setup_disk_write, note="page cache")
    bench.measure(
        "disk files", "read", lambda: lambda: [plane.read(p) for p in payloads], note="page cache"
    )
    plane.discard(payloads)


def gpu_paths(bench: Bench) -> None:
    sync = torch.cuda.synchronize
    staging = PinnedStaging(bench.block_bytes, bench.num_blocks, "cuda")
    on_device = staging.upload(bench.payloads)
    assert staging.download(on_device) == bench.payloads, "pinned staging corrupted blocks"

    def pageable_upload() -> torch.Tensor:
        rows = torch.stack(
            [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in bench.payloads]
        )
        return rows.to("cuda")

    bench.measure("store->gpu", "pageable (bytearray+stack)", lambda: pageable_upload, sync)
    bench.measure(
        "store->gpu", "pinned staging", lambda: lambda: staging.upload(bench.payloads), sync
    )
    bench.measure("gpu->store", "pinned staging", lambda: lambda: staging.download(on_device), sync)
    bench.measure(
        "gpu->store", "pageable (.cpu() + tobytes)",
        lambda: lambda: [r.numpy().tobytes() for r in on_device.cpu()], sync,
    )  # fmt: skip

    pinned = torch.empty((bench.num_blocks, bench.block_bytes), dtype=torch.uint8, pin_memory=True)
    device = torch.empty_like(pinned, device="cuda")
    bench.measure(
        "limit", "copy engine H2D (one pinned copy)",
        lambda: lambda: device.copy_(pinned, non_blocking=True), sync,
    )  # fmt: skip
    bench.measure(
        "limit", "copy engine D2H (one pinned copy)",
        lambda: lambda: pinned.copy_(device, non_blocking=True), sync,
    )  # fmt: skip
    other = torch.empty_like(device)
    bench.measure("limit", "device copy D2D", lambda: lambda: other.copy_(device), sync,
                  note="counts bytes once (read+write is twice)")  # fmt: skip
    if cuda_ipc_available():
        _ipc_path(bench, device)
    else:
        bench.notes.append("CUDA IPC not available here: path skipped")


def _ipc_path(bench: Bench, device: torch.Tensor) -> None:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(
        target=_ipc_reader, args=(export_cuda_tensor(device), bench.repeats, results)
    )
    proc.start()
    seconds, same = results.get(timeout=300)
    proc.join(60)
    median = statistics.median(seconds)
    bench.rows.append({
        "path": "cuda ipc", "op": "other process copies out of this one's memory",
        "gbps": bench.total_bytes / median / 1e9,
        "gbps_best": bench.total_bytes / min(seconds) / 1e9,
        "ms_median": median * 1e3, "note": f"bytes identical: {same}",
    })  # fmt: skip
    print(f"{'cuda ipc':>22} {'copy from peer process':<28} {bench.rows[-1]['gbps']:9.2f} GB/s")


def _ipc_reader(handle: Any, repeats: int, results: Any) -> None:
    source = import_cuda_tensor(handle)
    target = torch.empty_like(source)
    seconds = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        target.copy_(source)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    results.put((seconds, bool(torch.equal(target, source))))


@contextmanager
def _opened(spec: str, capacity_blocks: int) -> Iterator[Any]:
    store = open_store(spec, capacity_blocks, namespace=f"bench-{uuid.uuid4().hex[:8]}")
    try:
        yield store
    finally:
        store.close()


@contextmanager
def _redis(url: str | None) -> Iterator[str | None]:
    """A Redis URL: the one given, else a private redis-server, else None (none on PATH)."""
    if url is not None:
        yield url
        return
    executable = shutil.which("redis-server")
    if executable is None or importlib.util.find_spec("redis") is None:
        yield None
        return
    import redis

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--loglevel", "warning"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        for _ in range(200):
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--block-kib", type=int, default=1024, help="bytes of one KV block")
    parser.add_argument("--num-blocks", type=int, default=64, help="blocks per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--redis-url", default=None, help="default: start a redis-server")
    parser.add_argument("--disk-dir", default=None, help="default: a temp dir")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")

    bench = Bench(args.block_kib * 1024, args.num_blocks, args.repeats)
    disk_dir = Path(args.disk_dir or tempfile.mkdtemp(prefix="pdmesh_bench_"))
    disk_query = f"disk_dir={disk_dir / 'tier'}"
    try:
        host_limits(bench, "start")
        store_paths(bench, "embedded", "embedded", note="no copy: same objects")
        raw_planes(bench, disk_dir)
        tier_paths(bench, "embedded+disk", f"embedded?{disk_query}")
        with _redis(args.redis_url) as url:
            if url is None:
                bench.notes.append(
                    "no redis-server on PATH (or no redis-py): the Redis-indexed store paths "
                    "(redis, redis+shm, redis+shm+disk, redis+p2p) were skipped"
                )
            else:
                host_port_db = url.partition("://")[2]
                store_paths(bench, "redis store", f"redis://{host_port_db}")
                store_paths(bench, "redis+shm store", f"redis+shm://{host_port_db}")
                tier_paths(bench, "redis+shm+disk", f"redis+shm://{host_port_db}?{disk_query}")
                p2p_paths(bench, host_port_db)
        if args.device == "cuda":
            gpu_paths(bench)
        host_limits(bench, "end")
    finally:
        shutil.rmtree(disk_dir, ignore_errors=True)
    _compare_with_limits(bench.rows)
    write_json(args.out, {
        **environment(),
        "redis_server": _redis_version(),
        "block_bytes": bench.block_bytes, "num_blocks": bench.num_blocks,
        "repeats": bench.repeats, "gbps_of": "bytes of the blocks moved / median wall time",
        "rows": bench.rows, "notes": bench.notes, "cpu_count": os.cpu_count(),
    })  # fmt: skip


def _compare_with_limits(rows: list[dict[str, Any]]) -> None:
    """Each path's rate as a fraction of the limit it is bounded by, measured in this run:
    host paths by a per-block copy into new bytes, store->gpu and gpu->store by the copy
    engine in that direction."""
    limits = {(r["path"], r["op"]): r["gbps"] for r in rows if r["path"] == "limit"}
    host = max(
        limits[("limit", f"memcpy per block to new bytes ({when})")] for when in ("start", "end")
    )
    for row in rows:
        if row["path"] == "limit":
            continue
        if row["path"] == "store->gpu":
            row["vs_limit"] = row["gbps"] / limits[("limit", "copy engine H2D (one pinned copy)")]
            row["limit"] = "copy engine H2D"
        elif row["path"] == "gpu->store":
            row["vs_limit"] = row["gbps"] / limits[("limit", "copy engine D2H (one pinned copy)")]
            row["limit"] = "copy engine D2H"
        elif row["path"] == "cuda ipc":
            row["vs_limit"] = row["gbps"] / limits[("limit", "device copy D2D")]
            row["limit"] = "device copy D2D"
        else:
            row["vs_limit"] = row["gbps"] / host
            row["limit"] = "memcpy per block to new bytes (the faster of start and end)"


def _redis_version() -> str | None:
    executable = shutil.which("redis-server")
    if executable is None:
        return None
    return subprocess.run([executable, "--version"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
