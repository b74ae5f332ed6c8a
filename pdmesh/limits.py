"""Bounds that keep a loaded mesh answering: beyond them a request is refused at once
(RESOURCE_EXHAUSTED) instead of waiting without limit, and a stopping service drains."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Environment variable of each field (``pdmesh up|serve`` flags override them).
ENV_NAMES = {
    "max_in_flight": "PDMESH_MAX_IN_FLIGHT",
    "max_waiting": "PDMESH_MAX_WAITING",
    "max_request_bytes": "PDMESH_MAX_REQUEST_BYTES",
    "drain_timeout_s": "PDMESH_DRAIN_TIMEOUT_S",
}


@dataclass(frozen=True)
class ServingLimits:
    #: Gateway: requests in flight at once; one more gets RESOURCE_EXHAUSTED.
    max_in_flight: int = 1024
    #: Worker: requests waiting in its engine's queue (not yet running); one more gets
    #: RESOURCE_EXHAUSTED.
    max_waiting: int = 256
    #: Gateway: largest request message in bytes (INVALID_ARGUMENT beyond).
    max_request_bytes: int = 4 << 20
    #: On SIGTERM: seconds in-flight requests get to finish before the service exits.
    drain_timeout_s: float = 30.0

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

    @classmethod
    def build(
        cls, overrides: Mapping[str, Any], environ: Mapping[str, str] = os.environ
    ) -> ServingLimits:
        """Defaults, then ``PDMESH_*`` variables, then ``overrides`` that are not None."""
        values: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            kind = float if item.name == "drain_timeout_s" else int
            raw = environ.get(ENV_NAMES[item.name])
            if raw is not None:
                try:
                    values[item.name] = kind(raw)
                except ValueError:
                    raise ValueError(f"{ENV_NAMES[item.name]}={raw!r} is not a number") from None
            if overrides.get(item.name) is not None:
                values[item.name] = overrides[item.name]
        return cls(**values)
