"""The gateway's end of the worker sessions: one long-lived stream per worker carries the
commands of every request routed there, and each step's events for all of them come back in
one message, demultiplexed here into one ``RequestFeed`` per request.

A feed coalesces: a request whose reader is slower than the worker (a slow client) reads
everything that arrived since its last read in one go, so no token is dropped and nothing
waits on anyone else. Memory per request is bounded by its ``max_tokens``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from pdmesh.v1 import generation_pb2 as gen_pb
from pdmesh.v1 import worker_pb2 as worker_pb
from serving.rpc import WorkerStatusError

logger = logging.getLogger(__name__)

UNSPECIFIED = gen_pb.FINISH_REASON_UNSPECIFIED


class WorkerGoneError(WorkerStatusError):
    """The session to a worker broke: the worker stopped or cannot be reached."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE.value[0], f"worker unavailable: {message}")


@dataclass
class Delta:
    """Everything a request's feed received since it was last read."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: int = UNSPECIFIED
    cached_tokens: int = 0
    kv: worker_pb.KVHandoff | None = None
    #: The gateway interrupted the read (an Abort): nothing more will be read.
    interrupted: bool = False


class RequestFeed:
    """One request's events from one worker, read as coalesced deltas."""

    def __init__(self) -> None:
        self._delta = Delta()
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        #: The worker reported the request's end (a finish reason, a hand-off or an error).
        self.ended = False

    def push(self, event: worker_pb.RequestEvent) -> None:
        if event.error_code:
            self.fail(WorkerStatusError(event.error_code, event.error_message))
            return
        delta = self._delta
        delta.token_ids.extend(event.token_ids)
        delta.logprobs.extend(event.logprobs)
        if event.cached_tokens:
            delta.cached_tokens = event.cached_tokens
        if event.HasField("kv"):
            delta.kv = event.kv
            self.ended = True
        if event.finish_reason != UNSPECIFIED:
            delta.finish_reason = event.finish_reason
            self.ended = True
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self.ended = True
        self._ready.set()

    def interrupt(self) -> None:
        self._delta.interrupted = True
        self._ready.set()

    async def next(self) -> Delta:
        """Waits for news; raises the request's failure (after its last tokens)."""
        await self._ready.wait()
        delta = self._delta
        if self._error is not None and not delta.token_ids:
            raise self._error
        self._delta = Delta(interrupted=delta.interrupted)
        if self._error is None and not delta.interrupted:
            self._ready.clear()
        return delta


class _Outbox:
    """The commands waiting for one call's request stream. Each call has its own, so a
    broken call's stream can never take commands meant for the one that replaced it."""

    def __init__(self) -> None:
        self.commands: list[worker_pb.SessionCommand] = []
        self.wake = asyncio.Event()
        self.closed = False

    def put(self, command: worker_pb.SessionCommand) -> None:
        self.commands.append(command)
        self.wake.set()

    def close(self) -> None:
        self.closed = True
        self.wake.set()

    async def stream(self) -> AsyncIterator[worker_pb.SessionCommands]:
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self.closed:
                return
            batch, self.commands = self.commands, []
            yield worker_pb.SessionCommands(commands=batch)


class WorkerSession:
    """The stream to one worker, opened on first use and again after it breaks."""

    def __init__(
        self, open_call: Callable[[AsyncIterator[Any]], Any], on_broken: Callable[[], None]
    ) -> None:
        self._open_call = open_call
        self._on_broken = on_broken
        self.feeds: dict[str, RequestFeed] = {}
        self._outbox: _Outbox | None = None
        self._reader: asyncio.Task[None] | None = None

    def start(self, start: worker_pb.StartRequest) -> RequestFeed:
        feed = RequestFeed()
        self.feeds[start.request_id] = feed
        self._send(worker_pb.SessionCommand(start=start))
        return feed

    def resume(self, request_id: str, first_token_id: int, kv: worker_pb.KVHandoff) -> None:
        resume = worker_pb.ResumeRequest(request_id=request_id, first_token_id=first_token_id)
        resume.kv.CopyFrom(kv)
        self._send(worker_pb.SessionCommand(resume=resume))

    def end(self, request_id: str) -> None:
        """The gateway is done with the request: the worker drops it if it still runs."""
        feed = self.feeds.pop(request_id, None)
        if feed is not None and not feed.ended and self._outbox is not None:
            self._send(worker_pb.SessionCommand(abort=request_id))

    def _send(self, command: worker_pb.SessionCommand) -> None:
        if self._outbox is None:
            outbox = self._outbox = _Outbox()
            self._reader = asyncio.create_task(self._run(self._open_call(outbox.stream()), outbox))
        self._outbox.put(command)

    async def _run(self, call: Any, outbox: _Outbox) -> None:
        reason = "the worker ended the session"
        try:
            async for message in call:
                for event in message.events:
                    feed = self.feeds.get(event.request_id)
                    if feed is not None:
                        feed.push(event)
        except grpc.aio.AioRpcError as error:
            reason = f"{error.code().name}: {error.details()}"
        except asyncio.CancelledError:
            reason = "cancelled"
            raise
        finally:
            call.cancel()
            outbox.close()
            if self._outbox is outbox:
                self._broken(reason)

    def _broken(self, reason: str) -> None:
        """Every request of the session fails as its worker went away."""
        self._reader = None
        self._outbox = None
        feeds, self.feeds = self.feeds, {}
        for feed in feeds.values():
            feed.fail(WorkerGoneError(reason))
        if feeds or reason != "cancelled":
            self._on_broken()

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
