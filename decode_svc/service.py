"""DecodeWorker servicer: first token and KV hand-off in, a stream of tokens out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from engine.errors import InvalidRequestError
from pdmesh.convert import FINISH_TO_PB, logprob_to_pb, sampling_from_pb
from pdmesh.v1 import worker_pb2 as worker_pb
from pdmesh.v1 import worker_pb2_grpc as worker_grpc
from pdmesh.worker_common import WorkerBase


class DecodeServicer(WorkerBase, worker_grpc.DecodeWorkerServicer):
    async def Decode(
        self, request: worker_pb.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb.DecodeResponse]:
        namespace = self.engine.engine.block_manager.namespace.decode()
        if request.kv.namespace != namespace:
            raise InvalidRequestError(
                f"KV blocks were written for {request.kv.namespace!r}, this worker reads "
                f"{namespace!r}"
            )
        stream = self.engine.generate(
            list(request.prompt_token_ids),
            sampling_from_pb(request.sampling),
            request.request_id,
            output_token_ids=[request.first_token_id],
            kv_import=list(request.kv.block_hashes),
        )
        async for output in stream:
            yield worker_pb.DecodeResponse(
                token_ids=output.new_token_ids,
                logprobs=[logprob_to_pb(lp) for lp in output.new_logprobs],
                finish_reason=FINISH_TO_PB[output.finish_reason],
            )


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
