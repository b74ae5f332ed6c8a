"""PrefillWorker servicer: prompt in, first token and KV hand-off out."""

from __future__ import annotations

import dataclasses

import grpc

from engine.sequence import FinishReason
from pdmesh.convert import FINISH_TO_PB, logprob_to_pb, sampling_from_pb
from pdmesh.v1 import worker_pb2 as worker_pb
from pdmesh.v1 import worker_pb2_grpc as worker_grpc
from pdmesh.worker_common import WorkerBase


class PrefillServicer(WorkerBase, worker_grpc.PrefillWorkerServicer):
    async def Prefill(
        self, request: worker_pb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb.PrefillResponse:
        params = sampling_from_pb(request.sampling)
        # The prefill worker stops after the first token whatever the request's length.
        first_only = dataclasses.replace(params, max_tokens=1)
        prompt = list(request.prompt_token_ids)
        final = None
        async for output in self.engine.generate(prompt, first_only, request.request_id):
            final = output
        assert final is not None
        if final.finish_reason is FinishReason.ABORT:
            return worker_pb.PrefillResponse(
                request_id=request.request_id, finish_reason=FINISH_TO_PB[FinishReason.ABORT]
            )
        assert final.kv_hashes is not None
        reason = final.finish_reason
        if reason is FinishReason.LENGTH and params.max_tokens > 1:
            reason = None  # only the prefill part is done: decoding continues elsewhere
        engine = self.engine.engine
        response = worker_pb.PrefillResponse(
            request_id=request.request_id,
            first_token_id=final.new_token_ids[0],
            kv=worker_pb.KVHandoff(
                block_hashes=final.kv_hashes,
                block_size=engine.block_manager.block_size,
                num_tokens=len(prompt),
                namespace=engine.block_manager.namespace.decode(),
            ),
            cached_tokens=final.num_cached_tokens,
            finish_reason=FINISH_TO_PB[reason],
        )
        if final.new_logprobs:
            response.logprob.CopyFrom(logprob_to_pb(final.new_logprobs[0]))
        return response
