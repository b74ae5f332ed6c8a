"""What the worker servicers share: the Session stream, abort and load report.

A session is one gateway's long-lived stream. Its commands become engine-core commands; the
engine core's outputs of one step for the session's requests go back as one SessionEvents
message. A role decides only how a StartRequest becomes an engine request and how an output
becomes an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc

from engine.core.client import EngineCoreClient, error_from
from engine.core.messages import Add, RequestOutput
from engine.errors import InvalidRequestError, WorkerLostError
from pdmesh.v1 import worker_pb2 as worker_pb
from serving.convert import FINISH_TO_PB, logprob_to_pb
from serving.request_log import RequestCalls
from serving.rpc import status_for

logger = logging.getLogger(__name__)


def failure_event(request_id: str, error: BaseException) -> worker_pb.RequestEvent:
    code, message = status_for(error)
    return worker_pb.RequestEvent(
        request_id=request_id, error_code=code.value[0], error_message=message
    )


def token_event(output: RequestOutput) -> worker_pb.RequestEvent:
    if output.error is not None:
        return failure_event(output.request_id, error_from(output.error))
    return worker_pb.RequestEvent(
        request_id=output.request_id,
        token_ids=output.new_token_ids,
        logprobs=[logprob_to_pb(lp) for lp in output.new_logprobs],
        finish_reason=FINISH_TO_PB[output.finish_reason],
        cached_tokens=output.num_cached_tokens,
    )


def code_name(event: worker_pb.RequestEvent) -> str:
    return grpc.StatusCode(  # type: ignore[call-arg]
        next(c.value for c in grpc.StatusCode if c.value[0] == event.error_code)
    ).name


class SessionSink:
    """The requests one session started; one step's events leave as one message."""

    def __init__(
        self,
        event_of: Callable[[RequestOutput], worker_pb.RequestEvent],
        calls: RequestCalls,
    ) -> None:
        self.event_of = event_of
        self.calls = calls
        self.queue: asyncio.Queue[worker_pb.SessionEvents] = asyncio.Queue()
        self.request_ids: set[str] = set()
        self._events: list[worker_pb.RequestEvent] = []

    def push(self, output: RequestOutput) -> None:
        event = self.event_of(output)
        if output.finish_reason is not None or output.error is not None:
            self._end(output.request_id, event)
        self._events.append(event)

    def fail(self, request_id: str, error: BaseException) -> None:
        event = failure_event(request_id, error)
        self._end(request_id, event)
        self._events.append(event)
        self.flush()

    def _end(self, request_id: str, event: worker_pb.RequestEvent) -> None:
        self.request_ids.discard(request_id)
        self.calls.finished(request_id, code_name(event))

    def flush(self) -> None:
        if self._events:
            self.queue.put_nowait(worker_pb.SessionEvents(events=self._events))
            self._events = []


class WorkerBase:
    #: The per-request call each session request stands for (logs and metrics).
    METHOD = "Generate"

    def __init__(self, core: EngineCoreClient, calls: RequestCalls | None = None) -> None:
        self.core = core
        self.calls = calls or RequestCalls(core.role, self.METHOD, None)

    # -- per role ---------------------------------------------------------------------------
    def to_add(self, start: worker_pb.StartRequest) -> Add:
        raise NotImplementedError

    def event_of(self, output: RequestOutput) -> worker_pb.RequestEvent:
        return token_event(output)

    # -- the session ------------------------------------------------------------------------
    async def Session(
        self,
        requests: AsyncIterator[worker_pb.SessionCommands],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[worker_pb.SessionEvents]:
        sink = SessionSink(self.event_of, self.calls)
        reader = asyncio.ensure_future(self._read(requests, sink))
        events: asyncio.Future[worker_pb.SessionEvents] | None = None
        try:
            while True:
                events = asyncio.ensure_future(sink.queue.get())
                await asyncio.wait({events, reader}, return_when=asyncio.FIRST_COMPLETED)
                if not events.done():  # the gateway closed its side: the session is over
                    return
                yield events.result()
        finally:
            for task in (reader, events):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            for request_id in list(sink.request_ids):  # nobody will read their tokens
                self.core.abort(request_id, abandoned=True)
                self.calls.finished(request_id, grpc.StatusCode.CANCELLED.name)

    async def _read(
        self, requests: AsyncIterator[worker_pb.SessionCommands], sink: SessionSink
    ) -> None:
        async for message in requests:
            for command in message.commands:
                self._command(command, sink)

    def _command(self, command: worker_pb.SessionCommand, sink: SessionSink) -> None:
        kind = command.WhichOneof("command")
        if kind == "abort":
            self.core.abort(command.abort)
            return
        if kind == "resume":
            resume = command.resume
            if resume.request_id in sink.request_ids:
                hashes = list(resume.kv.block_hashes)
                self.core.resume(resume.request_id, resume.first_token_id, hashes)
            return
        start = command.start
        try:
            if start.request_id in sink.request_ids:
                raise InvalidRequestError(f"request id {start.request_id!r} is already running")
            self.calls.started(start.request_id)
            self.core.add(self.to_add(start), sink)
            sink.request_ids.add(start.request_id)
        except (InvalidRequestError, WorkerLostError, ValueError) as error:
            sink.fail(start.request_id, error)

    # -- unary ------------------------------------------------------------------------------
    async def Abort(
        self, request: worker_pb.WorkerAbortRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb.WorkerAbortResponse:
        known = self.core.is_running(request.request_id)
        self.core.abort(request.request_id)
        return worker_pb.WorkerAbortResponse(aborted=known)

    async def Load(
        self, request: worker_pb.LoadRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb.LoadReport:
        if not self.core.healthy:  # the router takes this worker out of rotation
            raise WorkerLostError("this worker is out of service")
        load = dataclasses.asdict(self.core.load())
        info = self.core.info
        assert info is not None
        return worker_pb.LoadReport(
            **load, namespace=info.namespace, scheduling_policy=info.scheduling_policy
        )

    async def Info(
        self, request: worker_pb.WorkerInfoRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb.WorkerInfo:
        info = self.core.info
        assert info is not None  # the servicer is added once the engine has loaded
        return worker_pb.WorkerInfo(
            namespace=info.namespace,
            model_name=Path(info.model_path).name,
            model_path=info.model_path,
            dtype=info.dtype,
            block_size=info.block_size,
            max_model_len=info.max_model_len,
            vocab_size=info.vocab_size,
            device=info.device,
            scheduling_policy=info.scheduling_policy,
        )

    @property
    def namespace(self) -> str:
        """The model and KV layout this worker's blocks are written for."""
        assert self.core.info is not None
        return self.core.info.namespace

    @property
    def block_size(self) -> int:
        """Tokens per KV block of this worker's engine."""
        assert self.core.info is not None
        return self.core.info.block_size
