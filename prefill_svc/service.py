"""PrefillWorker servicer: prompts in, first tokens and KV hand-offs out (over sessions)."""

from __future__ import annotations

import dataclasses

from engine.core.client import EngineCoreClient
from engine.core.messages import Add, RequestOutput
from engine.sequence import FinishReason
from pdmesh.v1 import worker_pb2 as worker_pb
from pdmesh.v1 import worker_pb2_grpc as worker_grpc
from serving.convert import FINISH_TO_PB, sampling_from_pb
from serving.request_log import RequestCalls
from serving.worker_common import WorkerBase, token_event


class PrefillServicer(WorkerBase, worker_grpc.PrefillWorkerServicer):
    METHOD = "Prefill"

    def __init__(self, core: EngineCoreClient, calls: RequestCalls | None = None) -> None:
        super().__init__(core, calls)
        #: Requests that go on decoding elsewhere after their first token.
        self._continues: set[str] = set()

    def to_add(self, start: worker_pb.StartRequest) -> Add:
        params = sampling_from_pb(start.sampling)
        if params.max_tokens > 1:
            self._continues.add(start.request_id)
        # The prefill worker stops after the first token whatever the request's length.
        first_only = dataclasses.replace(params, max_tokens=1)
        return Add(
            start.request_id, list(start.prompt_token_ids), first_only, priority=start.priority
        )

    def event_of(self, output: RequestOutput) -> worker_pb.RequestEvent:
        continues = output.request_id in self._continues
        if output.finish_reason is not None or output.error is not None:
            self._continues.discard(output.request_id)
        event = token_event(output)
        if output.kv_hashes is None or output.error is not None:
            return event
        reason = output.finish_reason
        if reason is FinishReason.LENGTH and continues:
            reason = None  # only the prefill part is done: decoding continues elsewhere
        event.finish_reason = FINISH_TO_PB[reason]
        event.kv.CopyFrom(
            worker_pb.KVHandoff(
                block_hashes=output.kv_hashes,
                block_size=self.block_size,
                num_tokens=output.num_prompt_tokens,
                namespace=self.namespace,
            )
        )
        return event
