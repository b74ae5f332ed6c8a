"""Bounds that keep a loaded mesh answering: beyond them a request is refused at once
(RESOURCE_EXHAUSTED) instead of waiting without limit, and a stopping service drains."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


@dataclass(frozen=True)
class ServingLimits:
    """Gateway and worker limits, from ``PDMESH_*`` variables or CLI flags."""

    #: Gateway: requests in flight at once; one more gets RESOURCE_EXHAUSTED.
    max_in_flight: int = field(default_factory=lambda: _env_int("PDMESH_MAX_IN_FLIGHT", 1024))
    #: Worker: requests waiting in its engine's queue (not yet running); one more gets
    #: RESOURCE_EXHAUSTED.
    max_waiting: int = field(default_factory=lambda: _env_int("PDMESH_MAX_WAITING", 256))
    #: Gateway: largest request message in bytes (INVALID_ARGUMENT beyond).
    max_request_bytes: int = field(
        default_factory=lambda: _env_int("PDMESH_MAX_REQUEST_BYTES", 4 << 20)
    )
    #: On SIGTERM: seconds in-flight requests get to finish before the service exits.
    drain_timeout_s: float = field(
        default_factory=lambda: _env_float("PDMESH_DRAIN_TIMEOUT_S", 30.0)
    )

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {self.max_in_flight}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.max_request_bytes < 1024:
            raise ValueError(
                f"max_request_bytes must be at least 1024, got {self.max_request_bytes}"
            )
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
