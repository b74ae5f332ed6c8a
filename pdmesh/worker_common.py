"""What the prefill and decode servicers share: abort and load report."""

from __future__ import annotations

import grpc

from engine.async_engine import AsyncEngine
from engine.errors import WorkerLostError
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
        if not self.engine.healthy:  # the router takes this worker out of rotation
            raise WorkerLostError("this worker is out of service")
        return worker_pb.LoadReport(**self.engine.load().__dict__)
