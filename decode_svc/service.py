"""DecodeWorker and ColocatedWorker servicers: requests in over sessions, tokens out."""

from __future__ import annotations

from engine.core.messages import Add, RequestOutput
from engine.errors import InvalidRequestError
from pdmesh.v1 import worker_pb2 as worker_pb
from pdmesh.v1 import worker_pb2_grpc as worker_grpc
from serving.convert import sampling_from_pb
from serving.worker_common import WorkerBase, token_event


class DecodeServicer(WorkerBase, worker_grpc.DecodeWorkerServicer):
    METHOD = "Decode"
    """Continues requests after their first token from the prompt's blocks in the store."""

    def to_add(self, start: worker_pb.StartRequest) -> Add:
        if start.kv.namespace != self.namespace:
            raise InvalidRequestError(
                f"KV blocks were written for {start.kv.namespace!r}, this worker reads "
                f"{self.namespace!r}"
            )
        prompt, params = list(start.prompt_token_ids), sampling_from_pb(start.sampling)
        if not start.HasField("first_token_id"):  # pipelined: pull blocks, wait for Resume
            return Add(start.request_id, prompt, params, prefetch=True, priority=start.priority)
        hashes = list(start.kv.block_hashes)
        return Add(
            start.request_id, prompt, params, [start.first_token_id], hashes,
            priority=start.priority,
        )  # fmt: skip

    def event_of(self, output: RequestOutput) -> worker_pb.RequestEvent:
        event = token_event(output)
        event.cached_tokens = 0  # the prompt came from the store: the prefill reports reuse
        return event


class ColocatedServicer(WorkerBase, worker_grpc.ColocatedWorkerServicer):
    """One engine does both roles: no hand-off, prompts and decodes share forward passes."""

    def to_add(self, start: worker_pb.StartRequest) -> Add:
        params = sampling_from_pb(start.sampling)
        return Add(start.request_id, list(start.prompt_token_ids), params, priority=start.priority)
