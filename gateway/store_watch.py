"""The gateway's view of its KV store: polled off the event loop, so an outage is named as
one (UNAVAILABLE "KV store unavailable" for requests, health NOT_SERVING, workers left in
service) and the gateway serves again as soon as the store answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from kvstore.base import KVStore
from kvstore.errors import KVStoreError

logger = logging.getLogger(__name__)

POLL_S = 1.0
#: A store slower than this to answer a stats call counts as unreachable.
TIMEOUT_S = 2.0


class StoreWatch:
    """Calls ``on_change(available)`` when the store stops or starts answering."""

    def __init__(
        self, store: KVStore, on_change: Callable[[bool], Awaitable[None]], poll_s: float = POLL_S
    ) -> None:
        self.store = store
        self.on_change = on_change
        self.poll_s = poll_s
        self.available = True
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            available = await self.probe()
            if available != self.available:
                self.available = available
                if available:
                    logger.info("the KV store answers again")
                else:
                    logger.warning("the KV store is unreachable: requests get UNAVAILABLE")
                await self.on_change(available)

    async def probe(self) -> bool:
        try:
            await asyncio.wait_for(asyncio.to_thread(self.store.stats), TIMEOUT_S)
        except (KVStoreError, TimeoutError):
            return False
        return True

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
