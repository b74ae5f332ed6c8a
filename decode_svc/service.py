"""DecodeWorker servicer: first token and KV hand-off in, a stream of tokens out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from engine.errors import InvalidRequestError
from pdmesh.convert import FINISH_TO_PB, logprob_to_pb, sampling_from_pb
from pdmesh.v1 import worker_pb2 as worker_pb
from pdmesh.v1 import worker_pb2_grpc as worker_grpc
from pdmesh.worker_common import WorkerBase


class DecodeServicer(WorkerBase, worker_grpc.DecodeWorkerServicer):
    async def Decode(
        self, requests: AsyncIterator[worker_pb.DecodeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb.DecodeResponse]:
        request = await anext(requests)
        namespace = self.engine.engine.block_manager.namespace.decode()
        if request.kv.namespace != namespace:
            raise InvalidRequestError(
                f"KV blocks were written for {request.kv.namespace!r}, this worker reads "
                f"{namespace!r}"
            )
        pipelined = not request.HasField("first_token_id")
        stream = self.engine.generate(
            list(request.prompt_token_ids),
            sampling_from_pb(request.sampling),
            request.request_id,
            output_token_ids=None if pipelined else [request.first_token_id],
            kv_import=None if pipelined else list(request.kv.block_hashes),
            prefetch=pipelined,
        )
        resume = asyncio.ensure_future(self._resume(requests, request.request_id, pipelined))
        try:
            async for output in stream:
                yield worker_pb.DecodeResponse(
                    token_ids=output.new_token_ids,
                    logprobs=[logprob_to_pb(lp) for lp in output.new_logprobs],
                    finish_reason=FINISH_TO_PB[output.finish_reason],
                )
        finally:
            resume.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await resume

    async def _resume(
        self, requests: AsyncIterator[worker_pb.DecodeRequest], request_id: str, pipelined: bool
    ) -> None:
        """A pipelined request continues once the caller sends its first token; a caller that
        ends its messages without one abandons it."""
        if not pipelined:
            return
        message = await anext(requests, None)
        if message is None or not message.HasField("first_token_id"):
            self.engine.abort(request_id)
            return
        self.engine.resume(request_id, message.first_token_id, list(message.kv.block_hashes))


class ColocatedServicer(WorkerBase, worker_grpc.ColocatedWorkerServicer):
    """One engine does both roles: no hand-off, prompts and decodes share forward passes."""

    async def Generate(
        self, request: worker_pb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb.DecodeResponse]:
        stream = self.engine.generate(
            list(request.prompt_token_ids), sampling_from_pb(request.sampling), request.request_id
        )
        async for output in stream:
            yield worker_pb.DecodeResponse(
                token_ids=output.new_token_ids,
                logprobs=[logprob_to_pb(lp) for lp in output.new_logprobs],
                finish_reason=FINISH_TO_PB[output.finish_reason],
                cached_tokens=output.num_cached_tokens,
            )
