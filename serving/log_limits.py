"""Log lines a client can cause at will (refused keys, bad requests) are rate-limited: one
line per reason per interval, the next one saying how many were left out, so a flood of bad
calls cannot flood the log (or hide everything else in it)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

INTERVAL_S = 10.0


@dataclass
class ThrottledLog:
    logger: logging.Logger
    level: int = logging.WARNING
    interval_s: float = INTERVAL_S
    clock: Callable[[], float] = time.monotonic
    #: reason -> (when it was last logged, calls left out since)
    _seen: dict[str, tuple[float, int]] = field(default_factory=dict)

    def log(self, reason: str, message: str, *args: object) -> None:
        now = self.clock()
        last, left_out = self._seen.get(reason, (float("-inf"), 0))
        if now - last < self.interval_s:
            self._seen[reason] = (last, left_out + 1)
            return
        if len(self._seen) > 1024:  # reasons are few; never let them grow without end
            self._seen.clear()
        self._seen[reason] = (now, 0)
        if left_out:
            message += f" ({left_out} more like it in the last {self.interval_s:.0f} s)"
        self.logger.log(self.level, message, *args)
