"""The in-process KV store: index and data in this process's memory, plus an optional disk
tier of block files.

It serves single-process deployments (the laptop demo, colocated mode, tests) and is the
reference the Redis-backed store must match block for block: same pinning, same eviction
order down the tiers, same promotion, same ``StoreFullError``, same lease expiry.

Same process means no copy: ``get`` returns the very ``bytes`` objects ``put`` stored.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

from kvstore.base import KVStore, StoreMetrics, StoreStats, TierOccupancy
from kvstore.block_hash import BlockHash
from kvstore.config import TierConfig
from kvstore.disk_tier import DiskFilePlane
from kvstore.errors import StoreFullError

if TYPE_CHECKING:
    from kvstore.device_lane import MemoryLaneIndex


class EmbeddedKVStore(KVStore):
    """Blocks in a dict (DRAM) and in files (disk), guarded by one lock.

    Eviction order: unpinned blocks of each tier queue in the order they became unpinned
    or arrived in that tier, oldest first. When an owner releases, its blocks are queued in
    reverse of the order it first pinned them, so the tail of a request's chain is evicted
    before its prefix, which more requests share. A DRAM victim moves to the back of the
    disk queue; a full disk drops its oldest unpinned block (or the victim, if every disk
    block is pinned). A ``get`` of a disk block moves it back to DRAM, swapping with the
    oldest unpinned DRAM block when DRAM is full; with DRAM all pinned it stays on disk.
    """

    @property
    def block_path(self) -> str:
        return "in-process"

    def __init__(self, capacity_blocks: int, config: TierConfig | None = None) -> None:
        self._config = config or TierConfig(capacity_blocks, lease_ttl_s=None)
        if self._config.capacity_blocks != capacity_blocks:
            raise ValueError("capacity_blocks and config.capacity_blocks differ")
        self._capacity_blocks = capacity_blocks
        self._lock = threading.Lock()
        self._dram: dict[BlockHash, bytes] = {}
        self._disk: dict[BlockHash, bytes] = {}  # block -> disk payload
        # Pins per block, summed over owners; a block is absent here once unpinned.
        self._pin_counts: dict[BlockHash, int] = {}
        # Per owner: block -> how often that owner pinned it, in first-pin order.
        self._owner_pins: dict[str, dict[BlockHash, int]] = {}
        # Unpinned blocks per tier, least recently used first: the eviction queues.
        self._dram_lru: OrderedDict[BlockHash, None] = OrderedDict()
        self._disk_lru: OrderedDict[BlockHash, None] = OrderedDict()
        # Owner -> lease deadline (monotonic s), soonest first (every renewal adds the TTL).
        self._leases: OrderedDict[str, float] = OrderedDict()
        self._counts: Counter[str] = Counter()
        self._bytes_moved: Counter[str] = Counter()
        self._disk_plane, self._own_disk_dir = self._open_disk()
        self._lane: MemoryLaneIndex | None = None

    def put(self, owner: str, blocks: Sequence[tuple[BlockHash, bytes]]) -> None:
        with self._lock:
            self._reap_expired()
            new_data: dict[BlockHash, bytes] = {}
            for block_hash, data in blocks:
                if not self._holds(block_hash) and block_hash not in new_data:
                    new_data[block_hash] = bytes(data)  # no copy when data is bytes
            listed = [block_hash for block_hash, _ in blocks]
            self._make_room(len(new_data), keep=set(listed))
            self._dram.update(new_data)
            self._bytes_moved["embedded_write"] += sum(len(d) for d in new_data.values())
            for block_hash in listed:
                self._pin(owner, block_hash)
            self._renew(owner)

    def match_prefix(self, hashes: Sequence[BlockHash]) -> int:
        with self._lock:
            self._reap_expired()
            num_matched = 0
            for block_hash in hashes:
                if not self._holds(block_hash):
                    self._counts["misses"] += 1
                    break
                num_matched += 1
            self._counts["hits"] += num_matched
            return num_matched

    def get(self, owner: str, hashes: Sequence[BlockHash]) -> list[bytes]:
        with self._lock:
            self._reap_expired()
            for block_hash in hashes:
                if not self._holds(block_hash):
                    self._counts["misses"] += 1
                    raise KeyError(f"block {block_hash.hex()} is not in the store")
            self._counts["hits"] += len(hashes)
            for block_hash in hashes:
                self._pin(owner, block_hash)
            if hashes:
                self._renew(owner)
            return [self._read_and_promote(block_hash) for block_hash in hashes]

    def release(self, owner: str) -> None:
        with self._lock:
            self._release(owner)

    def device_lane(self) -> MemoryLaneIndex:
        with self._lock:
            if self._lane is None:
                from kvstore.device_lane import MemoryLaneIndex

                self._lane = MemoryLaneIndex()
            return self._lane

    def locate(self, block_hash: BlockHash) -> str | None:
        with self._lock:
            if block_hash in self._dram:
                return "dram"
            return "disk" if block_hash in self._disk else None

    def renew(self, owner: str) -> bool:
        with self._lock:
            self._reap_expired()
            if owner not in self._owner_pins:
                return False
            self._renew(owner)
            return True

    def stats(self) -> StoreStats:
        with self._lock:
            self._reap_expired()
            return StoreStats(
                num_blocks=len(self._dram) + len(self._disk),
                num_pinned_blocks=len(self._pin_counts),
                capacity_blocks=self._capacity_blocks,
            )

    def metrics(self) -> StoreMetrics:
        with self._lock:
            self._reap_expired()
            return StoreMetrics(
                tiers=self._occupancy(),
                hits=self._counts["hits"],
                misses=self._counts["misses"],
                demotions=self._counts["demotions"],
                promotions=self._counts["promotions"],
                evictions=self._counts["evictions"],
                expired_owners=self._counts["expired_owners"],
                num_owners=len(self._owner_pins),
                bytes_moved=dict(self._bytes_moved),
            )

    def disk_files(self) -> list[str]:
        """Block files of this store that exist now (tests count them for leaks)."""
        return self._disk_plane.file_names() if self._disk_plane else []

    def close(self) -> None:
        with self._lock:
            if self._disk_plane is not None:
                self._disk_plane.discard(self._disk.values())
                if self._own_disk_dir:
                    shutil.rmtree(self._disk_plane.directory, ignore_errors=True)
            self._disk.clear()
            self._disk_lru.clear()

    # -- tiers -------------------------------------------------------------------------

    def _open_disk(self) -> tuple[DiskFilePlane | None, bool]:
        if not self._config.has_disk:
            return None, False
        if self._config.disk_dir is None:  # nobody shares it: a private folder, removed on close
            return DiskFilePlane(Path(tempfile.mkdtemp(prefix="pdmesh_kv_")), "embedded"), True
        return DiskFilePlane(Path(self._config.disk_dir), f"embedded-{id(self)}"), False

    def _holds(self, block_hash: BlockHash) -> bool:
        return block_hash in self._dram or block_hash in self._disk

    def _make_room(self, num_new_blocks: int, keep: set[BlockHash]) -> None:
        """Moves the least recently used unpinned DRAM blocks down so ``num_new_blocks`` fit;
        ``keep`` are blocks the caller is about to pin. Checks before moving anything, so a
        failure changes nothing."""
        num_to_evict = len(self._dram) + num_new_blocks - self._capacity_blocks
        if num_to_evict <= 0:
            return
        victims = list(islice(_excluding(self._dram_lru, keep), num_to_evict))
        if len(victims) < num_to_evict:
            raise StoreFullError(
                num_new_blocks=num_new_blocks,
                num_free_blocks=self._capacity_blocks - len(self._dram),
                num_evictable_blocks=len(victims),
                capacity_blocks=self._capacity_blocks,
            )
        for block_hash in victims:
            self._demote(block_hash, keep)

    def _demote(self, block_hash: BlockHash, keep: set[BlockHash]) -> None:
        """Moves an unpinned DRAM block to disk, or drops it when there is no disk tier or
        every disk block is pinned or in ``keep``."""
        del self._dram_lru[block_hash]
        data = self._dram.pop(block_hash)
        plane = self._disk_plane
        if plane is None or not self._disk_has_room(keep):
            self._counts["evictions"] += 1
            return
        self._disk[block_hash] = plane.write(block_hash.hex(), data)
        self._disk_lru[block_hash] = None
        self._counts["demotions"] += 1
        self._bytes_moved["disk_write"] += len(data)

    def _disk_has_room(self, keep: set[BlockHash]) -> bool:
        """Drops the oldest unpinned disk block not in ``keep`` if the disk is full; False
        if there is none."""
        if len(self._disk) < self._config.disk_capacity_blocks:
            return True
        victim = next(iter(_excluding(self._disk_lru, keep)), None)
        if victim is None:
            return False
        del self._disk_lru[victim]
        assert self._disk_plane is not None
        self._disk_plane.discard([self._disk.pop(victim)])
        self._counts["evictions"] += 1
        return True

    def _read_and_promote(self, block_hash: BlockHash) -> bytes:
        """A pinned block's bytes; a disk block moves up to DRAM if a DRAM slot is free or
        an unpinned DRAM block can swap down with it."""
        if block_hash in self._dram:
            data = self._dram[block_hash]
            self._bytes_moved["embedded_read"] += len(data)
            return data
        assert self._disk_plane is not None
        payload = self._disk[block_hash]
        data = self._disk_plane.read(payload)
        self._bytes_moved["disk_read"] += len(data)
        if len(self._dram) >= self._capacity_blocks and not self._dram_lru:
            return data  # DRAM is all pinned: serve from disk
        del self._disk[block_hash]
        self._disk_plane.discard([payload])
        if len(self._dram) >= self._capacity_blocks:
            self._demote(next(iter(self._dram_lru)), set())  # takes the disk slot just freed
        self._dram[block_hash] = data
        self._counts["promotions"] += 1
        return data

    def _occupancy(self) -> tuple[TierOccupancy, ...]:
        pinned_in_dram = sum(1 for block_hash in self._pin_counts if block_hash in self._dram)
        tiers = [
            TierOccupancy("dram", len(self._dram), pinned_in_dram, self._capacity_blocks),
        ]
        if self._config.has_disk:
            num_pinned = len(self._pin_counts) - pinned_in_dram
            tiers.append(
                TierOccupancy(
                    "disk", len(self._disk), num_pinned, self._config.disk_capacity_blocks
                )
            )
        return tuple(tiers)

    # -- pins and leases ---------------------------------------------------------------

    def _pin(self, owner: str, block_hash: BlockHash) -> None:
        num_pins = self._pin_counts.get(block_hash, 0) + 1
        self._pin_counts[block_hash] = num_pins
        if num_pins == 1:
            self._dram_lru.pop(block_hash, None)
            self._disk_lru.pop(block_hash, None)
        owner_pins = self._owner_pins.setdefault(owner, {})
        owner_pins[block_hash] = owner_pins.get(block_hash, 0) + 1

    def _unpin(self, block_hash: BlockHash, num_pins: int) -> None:
        remaining = self._pin_counts[block_hash] - num_pins
        if remaining > 0:
            self._pin_counts[block_hash] = remaining
            return
        del self._pin_counts[block_hash]
        if block_hash in self._dram:
            self._dram_lru[block_hash] = None
        else:
            self._disk_lru[block_hash] = None

    def _release(self, owner: str) -> None:
        self._leases.pop(owner, None)
        owner_pins = self._owner_pins.pop(owner, {})
        for block_hash, num_pins in reversed(owner_pins.items()):
            self._unpin(block_hash, num_pins)

    def _renew(self, owner: str) -> None:
        ttl_s = self._config.lease_ttl_s
        if ttl_s is not None:
            self._leases[owner] = time.monotonic() + ttl_s
            self._leases.move_to_end(owner)

    def _reap_expired(self) -> None:
        """Releases every owner whose lease ran out (its holder stopped renewing it)."""
        now = time.monotonic()
        while self._leases:
            owner, deadline = next(iter(self._leases.items()))
            if deadline > now:
                return
            self._release(owner)
            self._counts["expired_owners"] += 1


def _excluding(block_hashes: Iterable[BlockHash], keep: set[BlockHash]) -> Iterable[BlockHash]:
    return (block_hash for block_hash in block_hashes if block_hash not in keep)
