"""The shared paged KV store's contract.

A block is named by its content hash (``kvstore.block_hash``) and holds the K and V of
``block_size`` tokens for every layer as one opaque byte string (the writer's layout; a
reader of the same namespace knows it). Blocks are pinned by the requests that need them:
a pinned block is never evicted; unpinned blocks stay as a prefix cache until capacity
forces least-recently-used eviction. With a disk tier (``kvstore.config.TierConfig``),
eviction moves a block down from DRAM to disk, and a ``get`` brings it back up; only a
full disk drops blocks. Pins are leases: an owner silent for ``lease_ttl_s`` loses them.

``StoreStats`` counts blocks of every tier and gives the DRAM capacity (where a ``put``
needs room); ``metrics()`` splits them per tier.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvstore.block_hash import BlockHash

if TYPE_CHECKING:  # torch only where a lane is used
    from kvstore.device_lane import LaneIndex


@dataclass(frozen=True)
class StoreStats:
    num_blocks: int
    num_pinned_blocks: int
    capacity_blocks: int


@dataclass(frozen=True)
class TierOccupancy:
    """One tier below the engine's device cache: ``"dram"`` (host memory: this process's
    heap, Redis values or shared memory) or ``"disk"`` (block files)."""

    name: str
    num_blocks: int
    num_pinned_blocks: int
    capacity_blocks: int


@dataclass(frozen=True)
class StoreMetrics:
    """What the store did, for dashboards and benchmarks. Occupancy and the event counts are
    the whole store's (every handle of a Redis namespace); ``bytes_moved`` is this handle's,
    per data path: ``"<plane>_write"`` and ``"<plane>_read"`` for the planes ``embedded``,
    ``redis``, ``shm`` and ``disk``."""

    tiers: tuple[TierOccupancy, ...]
    #: Blocks found by ``match_prefix`` or ``get``.
    hits: int = 0
    #: Lookups that ended at an absent block (one per ``match_prefix`` that stopped early,
    #: one per ``get`` that raised ``KeyError``).
    misses: int = 0
    #: Blocks moved from DRAM to disk to make room.
    demotions: int = 0
    #: Blocks moved from disk back to DRAM because a ``get`` used them.
    promotions: int = 0
    #: Blocks that left the store entirely (the bottom tier was full).
    evictions: int = 0
    #: Owners whose lease expired and whose pins were reclaimed.
    expired_owners: int = 0
    #: Owners holding pins now.
    num_owners: int = 0
    bytes_moved: Mapping[str, int] = field(default_factory=dict)

    def tier(self, name: str) -> TierOccupancy:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise KeyError(f"no tier {name!r}; tiers: {[t.name for t in self.tiers]}")


class KVStore(ABC):
    """Index + data plane behind one interface. Thread-safe; every method may be called from
    any worker of any process that shares the store."""

    @abstractmethod
    def put(self, owner: str, blocks: Sequence[tuple[BlockHash, bytes]]) -> None:
        """Stores blocks not yet present and pins every listed block for ``owner``."""

    @abstractmethod
    def match_prefix(self, hashes: Sequence[BlockHash]) -> int:
        """How many leading blocks of ``hashes`` the store holds."""

    @abstractmethod
    def get(self, owner: str, hashes: Sequence[BlockHash]) -> list[bytes]:
        """Pins the blocks for ``owner`` and returns their data; KeyError if one is missing."""

    @abstractmethod
    def release(self, owner: str) -> None:
        """Unpins every block ``owner`` pinned; idempotent."""

    @abstractmethod
    def stats(self) -> StoreStats: ...

    @property
    def block_path(self) -> str:
        """How block bytes travel between the store's users: "in-process" (one process
        shares them), "shared-memory" (processes of one host) or "redis" (any host)."""
        return "redis"

    def locate(self, block_hash: BlockHash) -> str | None:
        """The tier holding the block (``"dram"`` or ``"disk"``), None if absent; pins and
        counts nothing (for transfer-path choices and tests)."""
        return "dram" if self.match_prefix([block_hash]) == 1 else None

    def renew(self, owner: str) -> bool:
        """Extends ``owner``'s lease (a heartbeat for a holder that keeps pins long without
        using the store); every ``put`` and ``get`` of the owner renews it too. Returns
        whether the owner holds pins. Stores without leases hold pins until ``release``."""
        return False

    def metrics(self) -> StoreMetrics:
        """Per-tier occupancy and event counts; stores without tiers report one DRAM tier."""
        stats = self.stats()
        tier = TierOccupancy(
            "dram", stats.num_blocks, stats.num_pinned_blocks, stats.capacity_blocks
        )
        return StoreMetrics(tiers=(tier,))

    def device_lane(self) -> LaneIndex | None:
        """The index of this store's device lane (``kvstore.device_lane``), shared by every
        handle of the store; None where the store has none."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases connections or shared memory held by this handle."""
