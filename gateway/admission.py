"""Which requests the gateway takes: at most ``max_in_flight`` at once, none while draining.

Refusing at once keeps latency bounded under overload: a client told RESOURCE_EXHAUSTED
can back off or go elsewhere, where a queue without end would only make every request late.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from engine.errors import OverloadedError
from serving.rpc import WorkerUnavailableError


class Admission:
    def __init__(self, max_in_flight: int) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.max_in_flight = max_in_flight
        self.num_in_flight = 0
        self.is_draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Holds one in-flight slot for the body, or raises before taking one."""
        if self.is_draining:
            raise WorkerUnavailableError("the gateway is shutting down")
        if self.num_in_flight >= self.max_in_flight:
            raise OverloadedError(
                f"the gateway has {self.num_in_flight} requests in flight, its limit "
                f"(max_in_flight); retry later"
            )
        self.num_in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.num_in_flight -= 1
            if self.num_in_flight == 0:
                self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Refuses new requests from now on and waits for the running ones to end; False
        when some were still running at the timeout."""
        self.is_draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True
