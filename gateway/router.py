"""Picks workers: least outstanding prefill tokens for prefill, most free KV blocks for decode.

The gateway counts the prompt tokens it has in flight on each prefill worker itself (exact
and immediate); decode capacity comes from each worker's Load report, refreshed in the
background and adjusted for requests sent since. A worker whose calls fail with UNAVAILABLE,
or whose Load stops answering, leaves the rotation until it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import grpc

from pdmesh.rpc import WorkerUnavailableError
from pdmesh.v1 import worker_pb2 as worker_pb
from pdmesh.v1 import worker_pb2_grpc as worker_grpc

logger = logging.getLogger(__name__)

LOAD_POLL_S = 0.5
LOAD_TIMEOUT_S = 2.0


@dataclass(eq=False)
class Worker:
    address: str
    role: str
    channel: grpc.aio.Channel
    stub: Any
    healthy: bool = True
    outstanding_prefill_tokens: int = 0
    in_flight: int = 0
    last_load: worker_pb.LoadReport = field(default_factory=worker_pb.LoadReport)

    @property
    def free_blocks(self) -> int:
        return self.last_load.num_free_blocks


def connect(address: str, role: str) -> Worker:
    channel = grpc.aio.insecure_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", 256 << 20),
            ("grpc.max_send_message_length", 256 << 20),
        ],
    )
    stub_type = worker_grpc.PrefillWorkerStub if role == "prefill" else worker_grpc.DecodeWorkerStub
    return Worker(address, role, channel, stub_type(channel))


class Router:
    def __init__(self, prefill_addresses: list[str], decode_addresses: list[str]) -> None:
        self.prefill = [connect(a, "prefill") for a in prefill_addresses]
        self.decode = [connect(a, "decode") for a in decode_addresses]
        self._poller: asyncio.Task[None] | None = None

    @property
    def workers(self) -> list[Worker]:
        return self.prefill + self.decode

    async def start(self) -> None:
        await self.refresh()
        self._poller = asyncio.create_task(self._poll())

    async def close(self) -> None:
        if self._poller:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for worker in self.workers:
            await worker.channel.close()

    async def refresh(self) -> None:
        await asyncio.gather(*(self._refresh_one(w) for w in self.workers))

    async def _refresh_one(self, worker: Worker) -> None:
        try:
            worker.last_load = await worker.stub.Load(
                worker_pb.LoadRequest(), timeout=LOAD_TIMEOUT_S
            )
            worker.healthy = True
        except grpc.aio.AioRpcError as error:
            if worker.healthy:
                logger.warning(
                    "%s worker %s unreachable: %s", worker.role, worker.address, error.code()
                )
            worker.healthy = False

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(LOAD_POLL_S)
            await self.refresh()

    def _healthy(self, pool: list[Worker]) -> list[Worker]:
        healthy = [w for w in pool if w.healthy]
        if not healthy:
            role = pool[0].role if pool else "any"
            raise WorkerUnavailableError(f"no healthy {role} worker")
        return healthy

    def pick_prefill(self, exclude: set[Worker] | None = None) -> Worker:
        candidates = [w for w in self._healthy(self.prefill) if w not in (exclude or set())]
        if not candidates:
            raise WorkerUnavailableError("no healthy prefill worker left to try")
        return min(candidates, key=lambda w: (w.outstanding_prefill_tokens, w.in_flight))

    def pick_decode(self) -> Worker:
        # Requests sent since the last report have taken blocks the report still counts free.
        return max(
            self._healthy(self.decode), key=lambda w: (w.free_blocks - w.in_flight, -w.in_flight)
        )

    def mark_failed(self, worker: Worker) -> None:
        worker.healthy = False
