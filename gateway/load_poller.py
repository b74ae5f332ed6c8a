"""Worker Load polls on a thread and event loop of their own.

A gateway streaming tens of thousands of tokens a second keeps its event loop busy; a poll
waiting in that loop's queue could run past its timeout and count against a healthy worker.
Here polls have their own loop (and their own channels: a grpc.aio channel belongs to the loop
that made it), so their timeouts measure the worker. Each answer is handed to the gateway's
loop, which alone changes router state; handing it over late only delays an update.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import grpc

from pdmesh.v1 import worker_pb2 as worker_pb

#: A poll's outcome: the worker's report, or the status code its Load call ended with.
PollResult: TypeAlias = worker_pb.LoadReport | grpc.StatusCode


async def ask_load(stub: Any, timeout_s: float) -> PollResult:
    try:
        report: worker_pb.LoadReport = await stub.Load(worker_pb.LoadRequest(), timeout=timeout_s)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return report


class LoadPoller:
    """Polls each of ``targets`` (a key and a function making its stub from a channel on the
    poll loop) every ``period_s`` and calls ``deliver(key, result)`` on ``home``, the
    gateway's loop."""

    def __init__(
        self,
        targets: Sequence[tuple[Any, str, Callable[[grpc.aio.Channel], Any]]],
        open_channel: Callable[[str], grpc.aio.Channel],
        deliver: Callable[[Any, PollResult], None],
        period_s: float,
        timeout_s: float,
    ) -> None:
        self.targets = list(targets)
        self.open_channel = open_channel
        self.deliver = deliver
        self.period_s = period_s
        self.timeout_s = timeout_s
        #: Rounds of polls answered or timed out (read by operators and tests).
        self.rounds = 0
        self._home: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-poller", daemon=True)

    def start(self) -> None:
        self._home = asyncio.get_running_loop()
        self._thread.start()
        self._started.wait()

    async def stop(self) -> None:
        if self._loop is not None and self._task is not None:
            with contextlib.suppress(RuntimeError):  # its loop already ended
                self._loop.call_soon_threadsafe(self._task.cancel)
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, 10)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._task = loop.create_task(self._poll())
        self._started.set()
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(self._task)
        loop.close()

    async def _poll(self) -> None:
        channels = [self.open_channel(address) for _, address, _ in self.targets]
        makers = [make for _, _, make in self.targets]
        stubs = [make(channel) for make, channel in zip(makers, channels, strict=True)]
        try:
            while True:
                await asyncio.sleep(self.period_s)
                results = await asyncio.gather(*(ask_load(s, self.timeout_s) for s in stubs))
                for (key, _, _), result in zip(self.targets, results, strict=True):
                    self._hand_over(key, result)
                self.rounds += 1
        finally:
            for channel in channels:
                await channel.close()

    def _hand_over(self, key: Any, result: PollResult) -> None:
        assert self._home is not None
        with contextlib.suppress(RuntimeError):  # the gateway's loop has closed
            self._home.call_soon_threadsafe(self.deliver, key, result)
