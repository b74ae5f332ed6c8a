"""Runs a Mesh on its own event loop thread, so tests can be plain synchronous gRPC clients."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc

from pdmesh.mesh import Mesh, MeshConfig, WorkerHandle, start_worker
from pdmesh.v1 import generation_pb2 as gen_pb
from pdmesh.v1 import generation_pb2_grpc as gen_grpc
from pdmesh.v1 import worker_pb2 as worker_pb
from serving.auth import bearer_metadata

T = TypeVar("T")


class MeshThread:
    def __init__(self, config: MeshConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.mesh = Mesh(config)
        self.run(self.mesh.start())
        self.channel = grpc.insecure_channel(self.mesh.gateway_address)
        self.stub = gen_grpc.GenerationStub(self.channel)

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 300) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.channel.close()
        self.run(self.mesh.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def mesh_metadata(self) -> tuple[tuple[str, str], ...]:
        """What a caller of a worker must present: the mesh's secret."""
        assert self.mesh.security.mesh_secret is not None
        return bearer_metadata(self.mesh.security.mesh_secret)

    def kill_worker(self, index: int) -> WorkerHandle:
        """As a crash looks to the rest of the mesh: the worker's server goes away at once,
        cutting every call in progress."""
        worker = self.mesh.workers[index]
        self.run(worker.server.stop(0))
        return worker

    def restart_worker(self, index: int) -> WorkerHandle:
        """A fresh worker (new engine) on the killed worker's address."""
        old = self.mesh.workers[index]
        self.run(old.engine.stop())
        config = self.mesh.config
        fresh = self.run(
            start_worker(
                old.role,
                config.engine,
                self.mesh.store_spec,
                old.address,
                self.mesh.security,
                limits=config.limits,
                store_capacity_blocks=config.store_capacity_blocks,
            )
        )
        self.mesh.workers[index] = fresh
        return fresh

    def loads(self) -> list[worker_pb.LoadReport]:
        reports = []
        for worker in self.mesh.workers:
            with grpc.insecure_channel(worker.address) as channel:
                from pdmesh.v1 import worker_pb2_grpc as worker_grpc

                stub_type = {
                    "prefill": worker_grpc.PrefillWorkerStub,
                    "decode": worker_grpc.DecodeWorkerStub,
                    "colocated": worker_grpc.ColocatedWorkerStub,
                }[worker.role]
                reports.append(
                    stub_type(channel).Load(
                        worker_pb.LoadRequest(), timeout=5, metadata=self.mesh_metadata()
                    )
                )
        return reports

    def wait_idle(self, timeout: float = 30) -> None:
        """Until no worker holds a block and the store holds no pin (or the timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.is_idle():
                return
            time.sleep(0.1)

    def is_idle(self) -> bool:
        used = [r.num_used_blocks for r in self.loads()]
        return not any(used) and self.mesh.store.stats().num_pinned_blocks == 0


def generate(
    stub: gen_grpc.GenerationStub, request: gen_pb.GenerateRequest
) -> gen_pb.GenerateResponse:
    """Collects a streamed generation into one response (text and ids concatenated)."""
    whole = gen_pb.GenerateResponse()
    for piece in stub.Generate(request, timeout=300):
        whole.text += piece.text
        whole.token_ids.extend(piece.token_ids)
        whole.finish_reason = piece.finish_reason
        if piece.HasField("usage"):
            whole.usage.CopyFrom(piece.usage)
            whole.timings.CopyFrom(piece.timings)
    return whole
