"""What the prefill and decode servicers share: abort and load report."""

from __future__ import annotations

import grpc

from engine.async_engine import AsyncEngine
from pdmesh.v1 import worker_pb2 as worker_pb


class WorkerBase:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def Abort(
        self, request: worker_pb.WorkerAbortRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb.WorkerAbortResponse:
        known = request.request_id in self.engine.engine.requests
        self.engine.abort(request.request_id)
        return worker_pb.WorkerAbortResponse(aborted=known)

    async def Load(
        self, request: worker_pb.LoadRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb.LoadReport:
        return worker_pb.LoadReport(**self.engine.load().__dict__)
