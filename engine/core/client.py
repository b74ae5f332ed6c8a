"""The service side of an engine core process: starts it, sends it commands, and hands each
step's outputs to whoever listens for those requests (a session sink or a stream).

Runs on the service's asyncio loop. Outputs of one step arrive as one message; every sink
they touch gets its outputs and then one ``flush``, so a session sends one message per step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

import msgspec
import zmq
import zmq.asyncio

from engine.config import EngineConfig
from engine.core.messages import (
    Abort,
    Add,
    Codec,
    Command,
    Drain,
    EngineInfo,
    LoadStats,
    Ready,
    RequestOutput,
    Resume,
    StepBatch,
    Stop,
)
from engine.core.process import CoreSpec, EngineStepError
from engine.errors import InvalidRequestError, OverloadedError, PdmeshError, WorkerLostError
from engine.sampling_params import SamplingParams
from kvstore.errors import KVStoreError, StoreFullError, StoreUnavailableError

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0
#: Domain errors rebuilt from their class name on this side of the process boundary.
ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (
        InvalidRequestError,
        OverloadedError,
        WorkerLostError,
        EngineStepError,
        KVStoreError,
        StoreFullError,
        StoreUnavailableError,
        ValueError,
    )
}


def error_from(pair: tuple[str, str]) -> Exception:
    name, message = pair
    return ERRORS.get(name, PdmeshError)(message)


class Sink(Protocol):
    """Receives the outputs of the requests it started, then one flush per step."""

    def push(self, output: RequestOutput) -> None: ...

    def flush(self) -> None: ...


class _Stream:
    """A sink for one request read as an async iterator (tests, tools)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

    def push(self, output: RequestOutput) -> None:
        self.queue.put_nowait(output)

    def flush(self) -> None:
        pass


class EngineCoreClient:
    """One engine core process and the requests this service runs on it."""

    def __init__(
        self,
        config: EngineConfig,
        role: str,
        store: str | None = None,
        store_capacity_blocks: int = 8192,
        *,
        name: str = "engine",
        max_waiting: int | None = None,
        on_lost: Callable[[], object] | None = None,
        env: dict[str, str] | None = None,
        metrics: bool = False,
    ) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="pdmesh-core-")
        base = Path(self._folder.name)
        self.spec = CoreSpec(
            engine=config,
            role=role,
            store=store,
            store_capacity_blocks=store_capacity_blocks,
            command_address=f"ipc://{base / 'commands'}",
            event_address=f"ipc://{base / 'events'}",
            max_waiting=max_waiting,
            metrics=metrics,
        )
        self._env = env or {}
        self.name = name
        self.role = role
        self.codec = Codec()
        #: False once the engine can no longer serve; ``on_lost`` runs once at that moment.
        self.healthy = True
        self._on_lost = on_lost
        self._sinks: dict[str, Sink] = {}
        self._load = LoadStats()
        self.info: EngineInfo | None = None
        #: Called with every step batch (worker metrics).
        self.batch_observers: list[Callable[[StepBatch], None]] = []
        self._process: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._context = zmq.asyncio.Context()
        self._commands = self._context.socket(zmq.PUSH)
        self._commands.setsockopt(zmq.SNDHWM, 0)
        self._commands.bind(self.spec.command_address)
        self._events = self._context.socket(zmq.PULL)
        self._events.bind(self.spec.event_address)

    # -- life -------------------------------------------------------------------------------
    async def start(self) -> EngineInfo:
        """Starts the process and waits until its model is loaded."""
        self._process = subprocess.Popen(
            [sys.executable, "-m", "engine.core.process", msgspec.json.encode(self.spec).decode()],
            stdin=subprocess.PIPE,  # closed when this process dies: the core exits too
            stdout=subprocess.PIPE,  # never written: end of file tells us the core died
            env={**os.environ, **self._env},
        )
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        fd = self._process.stdout.fileno()

        def on_exit() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(fd, on_exit)
        first = asyncio.ensure_future(self._events.recv())
        try:
            await asyncio.wait(
                {first, exited}, timeout=START_TIMEOUT_S, return_when="FIRST_COMPLETED"
            )
        finally:
            loop.remove_reader(fd)
        if not first.done():
            first.cancel()
            died = exited.done()
            self._process.kill()
            code = self._process.wait()
            raise WorkerLostError(
                f"the engine core process exited ({code})"
                if died
                else f"the engine core did not load its model in {START_TIMEOUT_S:.0f} s"
            )
        ready = self.codec.events.decode(first.result())
        assert isinstance(ready, Ready)
        if ready.error is not None:
            raise error_from(ready.error)
        assert ready.info is not None
        self.info = ready.info
        # Until the first step reports, every block is free: a router that asks before then
        # (a worker that just started or restarted) must not see an engine without room.
        blocks = ready.info.num_blocks
        self._load = LoadStats(num_free_blocks=blocks, num_total_blocks=blocks)
        loop.add_reader(fd, self._died)
        self._reader = asyncio.create_task(self._read())
        return ready.info

    async def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(RuntimeError, ValueError):
                asyncio.get_running_loop().remove_reader(self._process.stdout.fileno())
            self._send(Stop())
            try:
                await asyncio.to_thread(self._process.wait, 30)
            except subprocess.TimeoutExpired:
                self._process.kill()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._commands.close(linger=0)
        self._events.close(linger=0)
        self._context.term()
        self._folder.cleanup()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # -- commands ---------------------------------------------------------------------------
    def add(self, add: Add, sink: Sink) -> None:
        """Starts a request whose outputs go to ``sink``."""
        if add.request_id in self._sinks:
            raise InvalidRequestError(f"request id {add.request_id!r} is already running here")
        if not self.healthy:
            raise WorkerLostError("this worker is out of service")
        self._sinks[add.request_id] = sink
        self._send(add)

    def resume(self, request_id: str, first_token_id: int, kv_hashes: list[bytes]) -> None:
        self._send(Resume(request_id, first_token_id, kv_hashes))

    def abort(self, request_id: str, abandoned: bool = False) -> None:
        """Ends the request; its sink still gets a final output (ABORT), unless ``abandoned``
        (its caller left: nobody listens any more)."""
        if abandoned:
            self._sinks.pop(request_id, None)
        self._send(Abort(request_id, abandoned))

    def drain(self, draining: bool = True) -> None:
        """Out of service: new requests are refused, running ones finish (``draining``
        False: back in service)."""
        self.healthy = not draining
        self._send(Drain(draining))

    def is_running(self, request_id: str) -> bool:
        return request_id in self._sinks

    def running_ids(self) -> list[str]:
        """The ids of the requests this core runs (for operators and tests)."""
        return list(self._sinks)

    def load(self) -> LoadStats:
        """The load after the engine's last step (or its last idle report)."""
        return self._load

    def _send(self, command: Command) -> None:
        self._commands.send(self.codec.encoder.encode(command), copy=False)

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        output_token_ids: list[int] | None = None,
        kv_import: list[bytes] | None = None,
        prefetch: bool = False,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """One request's outputs until it finishes; leaving early aborts it."""
        stream = _Stream()
        add = Add(
            request_id, prompt_token_ids, params, output_token_ids, kv_import, prefetch, priority
        )
        self.add(add, stream)
        finished = False
        try:
            while not finished:
                output = await stream.queue.get()
                if output.error is not None:
                    finished = True
                    raise error_from(output.error)
                finished = output.finish_reason is not None
                yield output
        finally:
            if not finished:
                self.abort(request_id, abandoned=True)

    # -- events -----------------------------------------------------------------------------
    async def _read(self) -> None:
        while True:
            frame = await self._events.recv(copy=False)
            batch = self.codec.events.decode(frame.buffer)
            if not isinstance(batch, StepBatch):
                continue
            self._load = batch.load
            self._dispatch(batch.outputs)
            for observe in self.batch_observers:
                observe(batch)
            if batch.lost is not None and self.healthy:
                self._lose(batch.lost)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        touched: dict[int, Sink] = {}
        for output in outputs:
            sink = self._sinks.get(output.request_id)
            if sink is None:
                continue
            if output.finish_reason is not None or output.error is not None:
                del self._sinks[output.request_id]
            sink.push(output)
            touched[id(sink)] = sink
        for sink in touched.values():
            sink.flush()

    def _died(self) -> None:
        asyncio.get_running_loop().remove_reader(self._process.stdout.fileno())
        code = self._process.wait()
        logger.error("%s: the engine core process exited (code %s)", self.name, code)
        self._lose(f"the engine core process exited (code {code})")

    def _lose(self, reason: str) -> None:
        """Every running request ends with UNAVAILABLE; the worker leaves service."""
        error = ("WorkerLostError", reason)
        sinks, self._sinks = self._sinks, {}
        self._dispatch_lost(sinks, error)
        self._load = LoadStats()
        if self.healthy and self._on_lost is not None:
            self._on_lost()
        self.healthy = False

    @staticmethod
    def _dispatch_lost(sinks: dict[str, Sink], error: tuple[str, str]) -> None:
        touched: dict[int, Sink] = {}
        for request_id, sink in sinks.items():
            sink.push(RequestOutput(request_id, [], [], None, 0, 0, None, error))
            touched[id(sink)] = sink
        for sink in touched.values():
            sink.flush()
