"""Drives a gateway over gRPC: open loop (requests sent at their arrival times, whatever is
still running) or closed loop (a fixed number of requests in flight), timing every token."""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from pdmesh.bench.stats import RequestResult
from pdmesh.bench.workload import BenchRequest
from pdmesh.v1 import generation_pb2 as gen_pb
from pdmesh.v1 import generation_pb2_grpc as gen_grpc


@dataclass(frozen=True)
class LoadShape:
    """Exactly one of: send times (open loop) or a concurrency (closed loop)."""

    arrival_offsets: tuple[float, ...] | None = None
    concurrency: int | None = None

    def __post_init__(self) -> None:
        if (self.arrival_offsets is None) == (self.concurrency is None):
            raise ValueError("give either arrival times or a concurrency")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")


def to_message(request: BenchRequest, temperature: float) -> gen_pb.GenerateRequest:
    # ignore_eos: every request generates exactly the workload's output length.
    message = gen_pb.GenerateRequest(
        max_tokens=request.max_tokens, temperature=temperature, ignore_eos=True
    )
    if request.prompt_token_ids:
        message.prompt_token_ids.extend(request.prompt_token_ids)
    else:
        message.prompt = request.prompt
    return message


async def send_one(
    stub: Any, request: BenchRequest, temperature: float, timeout_s: float
) -> RequestResult:
    result = RequestResult(prompt_len=request.prompt_len)
    start = last = time.perf_counter()
    try:
        async for piece in stub.Generate(to_message(request, temperature), timeout=timeout_s):
            if piece.token_ids:
                now = time.perf_counter()
                if result.output_len == 0:
                    result.ttft_s = now - start
                else:
                    result.itls_s.append(now - last)
                last = now
                result.output_len += len(piece.token_ids)
            if piece.HasField("usage"):
                result.prompt_len = piece.usage.prompt_tokens
        result.e2e_s = last - start
        result.success = result.output_len > 0
        result.error = "" if result.success else "no tokens"
    except grpc.aio.AioRpcError as error:
        result.error = f"{error.code().name}: {error.details()}"
    return result


class Progress:
    """A tqdm bar on stderr when it is a terminal (or forced); silent otherwise."""

    def __init__(self, total: int, label: str, enabled: bool | None) -> None:
        enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit="req", file=sys.stderr)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def run_load(
    target: str,
    requests: Sequence[BenchRequest],
    shape: LoadShape,
    temperature: float = 0.0,
    timeout_s: float = 600.0,
    label: str = "bench",
    progress: bool | None = None,
    connections: int = 1,
) -> tuple[list[RequestResult], float]:
    """Every request's result (in workload order) and the run's wall time in seconds; request i
    goes over connection i % connections."""
    bar = Progress(len(requests), label, progress)
    results: list[RequestResult | None] = [None] * len(requests)
    # Each channel a connection of its own (equal channels share one): a gateway of several
    # processes on one port (SO_REUSEPORT) is spread over by connection, not by request.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(connections)]
    stubs = [gen_grpc.GenerationStub(channel) for channel in channels]

    async def one(index: int) -> None:
        stub = stubs[index % len(stubs)]
        results[index] = await send_one(stub, requests[index], temperature, timeout_s)
        bar.advance()

    try:
        start = time.perf_counter()
        if shape.arrival_offsets is not None:
            await _open_loop(one, shape.arrival_offsets, start)
        else:
            assert shape.concurrency is not None
            await _closed_loop(one, len(requests), shape.concurrency)
        duration = time.perf_counter() - start
    finally:
        for channel in channels:
            await channel.close()
    bar.close()
    return [r for r in results if r is not None], duration


async def _open_loop(one: Any, offsets: Sequence[float], start: float) -> None:
    tasks = []
    for index, offset in enumerate(offsets):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index)))
    await asyncio.gather(*tasks)


async def _closed_loop(one: Any, num_requests: int, concurrency: int) -> None:
    pending = iter(range(num_requests))

    async def client() -> None:
        for index in pending:  # the shared iterator hands each request to one client
            await one(index)

    await asyncio.gather(*(client() for _ in range(min(concurrency, num_requests))))


#: Connections each load-generator process opens (requests round-robin over them).
CONNECTIONS_PER_CLIENT = 4


def run_load_processes(
    target: str,
    requests: Sequence[BenchRequest],
    shape: LoadShape,
    temperature: float = 0.0,
    timeout_s: float = 600.0,
    clients: int = 1,
) -> tuple[list[RequestResult], float]:
    """The load split over ``clients`` processes, each with its own event loop and GIL, so
    hundreds of streams are not limited by one Python process reading them. Request i goes
    to client i % clients (with its arrival time, or its share of the concurrency); all start
    together at a barrier, and the wall time runs from the first start to the last end."""
    if clients <= 1:
        return asyncio.run(
            run_load(target, requests, shape, temperature, timeout_s, progress=False)
        )
    return spawn_clients(_client, target, requests, shape, temperature, timeout_s, clients)


def spawn_clients(
    client: Callable[..., None],
    target: str,
    requests: Sequence[BenchRequest],
    shape: LoadShape,
    temperature: float,
    timeout_s: float,
    clients: int,
) -> tuple[list[RequestResult], float]:
    """Runs ``client(target, part, share, temperature, timeout_s, barrier, queue)`` in
    ``clients`` spawned processes (gRPC or HTTP); each puts (start, end, results) on the
    queue once done."""
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(clients), context.Queue()
    processes = []
    for part, share in split_load(requests, shape, clients):
        args = (target, part, share, temperature, timeout_s, barrier, queue)
        processes.append(context.Process(target=client, args=args, daemon=True))
    for process in processes:
        process.start()
    reports = [queue.get(timeout=timeout_s + 120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    results = [result for _, _, part in reports for result in part]
    return results, max(end for _, end, _ in reports) - min(start for start, _, _ in reports)


def split_load(
    requests: Sequence[BenchRequest], shape: LoadShape, clients: int
) -> list[tuple[list[BenchRequest], LoadShape]]:
    """Client i's requests (i, i + clients, ...) and its share of the load shape."""
    parts = []
    for index in range(clients):
        part = list(requests[index::clients])
        if shape.arrival_offsets is not None:
            share = LoadShape(arrival_offsets=shape.arrival_offsets[index::clients])
        else:
            assert shape.concurrency is not None
            extra = int(index < shape.concurrency % clients)
            share = LoadShape(concurrency=max(1, shape.concurrency // clients + extra))
        parts.append((part, share))
    return parts


def _client(
    target: str,
    requests: list[BenchRequest],
    shape: LoadShape,
    temperature: float,
    timeout_s: float,
    barrier: Any,
    queue: Any,
) -> None:
    barrier.wait()
    started = time.time()
    results, _ = asyncio.run(
        run_load(
            target, requests, shape, temperature, timeout_s, progress=False,
            connections=CONNECTIONS_PER_CLIENT,
        )
    )  # fmt: skip
    queue.put((started, time.time(), results))
