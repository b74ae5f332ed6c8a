"""Opens a KV store from one spec string, so a service's config names its store as data.

Specs:

- ``embedded``                   in this process only.
- ``redis://host:port/db``       index and block bytes in Redis: processes on any host.
- ``rediss://host:port/db``      the same over TLS.
- ``redis+shm://host:port/db``   index in Redis, block bytes in POSIX shared memory: every
                                 process that opens it must run on one host.
- ``redis+p2p://host:port/db``   index in Redis, block bytes in shared memory on the host
                                 that wrote them, pulled over gRPC by readers on other
                                 hosts (``?peer_host=`` names this host for them).

Any spec takes tier and lease options as a query (``kvstore.config``):
``?disk_blocks=N`` adds a disk tier of N blocks (files under ``disk_dir``, default a
per-namespace folder in the temp dir), ``lease_ttl_s=T`` (or ``none``) sets how long an
owner's pins outlive its last operation.
"""

from __future__ import annotations

from kvstore.base import KVStore
from kvstore.config import TierConfig, split_spec
from kvstore.data_planes import DataPlaneKind
from kvstore.embedded import EmbeddedKVStore

# spec scheme -> (scheme redis-py connects with, data plane)
_REDIS_SCHEMES: dict[str, tuple[str, DataPlaneKind]] = {
    "redis": ("redis", "redis"),
    "rediss": ("rediss", "redis"),
    "redis+shm": ("redis", "shm"),
    "redis+p2p": ("redis", "p2p"),
}


def open_store(spec: str, capacity_blocks: int, *, namespace: str = "pdmesh") -> KVStore:
    """The store ``spec`` names, holding at most ``capacity_blocks`` blocks. ``namespace``
    separates stores sharing one Redis (the embedded store has no one to share with)."""
    base, tiers = split_spec(spec, capacity_blocks)
    return open_tiered_store(base, tiers, namespace=namespace)


def open_tiered_store(spec: str, tiers: TierConfig, *, namespace: str = "pdmesh") -> KVStore:
    """The store ``spec`` (without a query) names, with the tiers and leases of ``tiers``."""
    if spec == "embedded":
        return EmbeddedKVStore(tiers.capacity_blocks, tiers)
    scheme, sep, rest = spec.partition("://")
    if sep and scheme in _REDIS_SCHEMES:
        # Imported here: hosts that never use Redis need not have redis-py.
        from kvstore.redis_store import RedisKVStore

        redis_scheme, data_plane = _REDIS_SCHEMES[scheme]
        return RedisKVStore(
            f"{redis_scheme}://{rest}",
            tiers.capacity_blocks,
            namespace=namespace,
            data_plane=data_plane,
            tiers=tiers,
        )
    raise ValueError(
        f"unknown KV store spec {spec!r}; expected 'embedded', 'redis://host:port/db', "
        "'rediss://host:port/db', 'redis+shm://host:port/db' or "
        "'redis+p2p://host:port/db'"
    )
