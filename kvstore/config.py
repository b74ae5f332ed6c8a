"""Tier and lease settings of a store, and their spelling as query parameters of a spec.

``open_store("redis+shm://host:6379/0?disk_blocks=4096&disk_dir=/nvme/kv&lease_ttl_s=120",
capacity_blocks=1024)``: so a service's ``--store`` flag carries the whole store config.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

#: How long an owner's pins live after its last operation or ``renew`` unless refreshed.
#: Generous: a request's pins only need to outlive the gap between its prefill and its
#: decode worker's read; a holder that died frees them after this long.
DEFAULT_LEASE_TTL_S = 600.0


@dataclass(frozen=True)
class TierConfig:
    """Capacities below the worker's own device cache (tier 0, the engine's).

    ``capacity_blocks`` is the host-DRAM tier (Redis values, shared memory or this
    process's heap); ``disk_capacity_blocks`` the file tier under ``disk_dir`` (0: no disk
    tier, DRAM victims are dropped). ``lease_ttl_s``: pins of an owner silent this long are
    released (None: never). ``peer_host``: the host name other hosts reach this one's
    peer-to-peer block server at (``redis+p2p`` stores; default: this host's name)."""

    capacity_blocks: int
    disk_capacity_blocks: int = 0
    disk_dir: str | None = None
    lease_ttl_s: float | None = DEFAULT_LEASE_TTL_S
    peer_host: str | None = None

    def __post_init__(self) -> None:
        if self.capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be at least 1, got {self.capacity_blocks}")
        if self.disk_capacity_blocks < 0:
            raise ValueError(
                f"disk_capacity_blocks must be at least 0, got {self.disk_capacity_blocks}"
            )
        if self.lease_ttl_s is not None and not self.lease_ttl_s > 0:
            raise ValueError(f"lease_ttl_s must be positive or None, got {self.lease_ttl_s}")

    @property
    def has_disk(self) -> bool:
        return self.disk_capacity_blocks > 0

    @property
    def lease_ttl_ms(self) -> int:
        """The TTL in whole milliseconds, 0 for none (how the Lua scripts take it)."""
        return 0 if self.lease_ttl_s is None else max(1, round(self.lease_ttl_s * 1000))

    def disk_path(self, namespace: str) -> Path:
        """Where this namespace's block files go: ``disk_dir`` or a per-namespace folder
        under the system temp dir, the same for every handle of the namespace on a host."""
        if self.disk_dir is not None:
            return Path(self.disk_dir)
        tag = hashlib.blake2b(namespace.encode(), digest_size=6).hexdigest()
        return Path(tempfile.gettempdir()) / f"pdmesh_kv_{tag}"

    def describe(self) -> str:
        """What every handle of a shared namespace must agree on, as text."""
        return (
            f"capacity_blocks={self.capacity_blocks} "
            f"disk_capacity_blocks={self.disk_capacity_blocks} lease_ttl_ms={self.lease_ttl_ms}"
        )


_QUERY_KEYS = ("disk_blocks", "disk_dir", "lease_ttl_s", "peer_host")


def split_spec(spec: str, capacity_blocks: int) -> tuple[str, TierConfig]:
    """``"base?disk_blocks=N&disk_dir=D&lease_ttl_s=T"`` -> (base, its TierConfig);
    ``lease_ttl_s=none`` turns leases off. Unknown keys are an error, not ignored."""
    base, _, query = spec.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    unknown = sorted(set(options) - set(_QUERY_KEYS))
    if unknown:
        raise ValueError(
            f"unknown KV store option(s) {unknown} in {spec!r}; known: {list(_QUERY_KEYS)}"
        )
    ttl_text = options.get("lease_ttl_s")
    try:
        config = TierConfig(
            capacity_blocks=capacity_blocks,
            disk_capacity_blocks=int(options.get("disk_blocks", "0")),
            disk_dir=options.get("disk_dir") or None,
            lease_ttl_s=_parse_ttl(ttl_text),
            peer_host=options.get("peer_host") or None,
        )
    except ValueError as error:
        raise ValueError(f"bad KV store spec {spec!r}: {error}") from None
    return base, config


def _parse_ttl(text: str | None) -> float | None:
    if text is None:
        return DEFAULT_LEASE_TTL_S
    if text.lower() == "none":
        return None
    return float(text)
