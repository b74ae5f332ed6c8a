"""The in-process KV store: index and data in this process's memory.

It serves single-process deployments (the laptop demo, colocated mode, tests) and is the
reference the Redis-backed store must match block for block: same pinning, same eviction
order, same ``StoreFullError``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from itertools import islice

from kvstore.base import KVStore, StoreStats
from kvstore.block_hash import BlockHash
from kvstore.errors import StoreFullError


class EmbeddedKVStore(KVStore):
    """Blocks in a dict, guarded by one lock.

    Eviction order: unpinned blocks queue in the order they became unpinned, oldest first.
    When an owner releases, its blocks are queued in reverse of the order it first pinned
    them, so the tail of a request's chain is evicted before its prefix, which more requests
    share.
    """

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be at least 1, got {capacity_blocks}")
        self._capacity_blocks = capacity_blocks
        self._lock = threading.Lock()
        self._data: dict[BlockHash, bytes] = {}
        # Pins per block, summed over owners; a block is absent here once unpinned.
        self._pin_counts: dict[BlockHash, int] = {}
        # Per owner: block -> how often that owner pinned it, in first-pin order.
        self._owner_pins: dict[str, dict[BlockHash, int]] = {}
        # Unpinned blocks, least recently used first: the eviction queue.
        self._evictable: OrderedDict[BlockHash, None] = OrderedDict()

    def put(self, owner: str, blocks: Sequence[tuple[BlockHash, bytes]]) -> None:
        with self._lock:
            new_data: dict[BlockHash, bytes] = {}
            for block_hash, data in blocks:
                if block_hash not in self._data and block_hash not in new_data:
                    new_data[block_hash] = bytes(data)
            listed = [block_hash for block_hash, _ in blocks]
            self._make_room(len(new_data), keep=set(listed))
            self._data.update(new_data)
            for block_hash in listed:
                self._pin(owner, block_hash)

    def match_prefix(self, hashes: Sequence[BlockHash]) -> int:
        with self._lock:
            for num_matched, block_hash in enumerate(hashes):
                if block_hash not in self._data:
                    return num_matched
            return len(hashes)

    def get(self, owner: str, hashes: Sequence[BlockHash]) -> list[bytes]:
        with self._lock:
            for block_hash in hashes:
                if block_hash not in self._data:
                    raise KeyError(f"block {block_hash.hex()} is not in the store")
            for block_hash in hashes:
                self._pin(owner, block_hash)
            return [self._data[block_hash] for block_hash in hashes]

    def release(self, owner: str) -> None:
        with self._lock:
            owner_pins = self._owner_pins.pop(owner, {})
            for block_hash, num_pins in reversed(owner_pins.items()):
                self._unpin(block_hash, num_pins)

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(
                num_blocks=len(self._data),
                num_pinned_blocks=len(self._pin_counts),
                capacity_blocks=self._capacity_blocks,
            )

    def _make_room(self, num_new_blocks: int, keep: set[BlockHash]) -> None:
        """Evicts the least recently used unpinned blocks so ``num_new_blocks`` fit; ``keep``
        are blocks the caller is about to pin. Checks before evicting, so a failure changes
        nothing."""
        num_to_evict = len(self._data) + num_new_blocks - self._capacity_blocks
        if num_to_evict <= 0:
            return
        victims = list(islice(_excluding(self._evictable, keep), num_to_evict))
        if len(victims) < num_to_evict:
            raise StoreFullError(
                num_new_blocks=num_new_blocks,
                num_free_blocks=self._capacity_blocks - len(self._data),
                num_evictable_blocks=len(victims),
                capacity_blocks=self._capacity_blocks,
            )
        for block_hash in victims:
            del self._evictable[block_hash]
            del self._data[block_hash]

    def _pin(self, owner: str, block_hash: BlockHash) -> None:
        num_pins = self._pin_counts.get(block_hash, 0) + 1
        self._pin_counts[block_hash] = num_pins
        if num_pins == 1:
            self._evictable.pop(block_hash, None)
        owner_pins = self._owner_pins.setdefault(owner, {})
        owner_pins[block_hash] = owner_pins.get(block_hash, 0) + 1

    def _unpin(self, block_hash: BlockHash, num_pins: int) -> None:
        remaining = self._pin_counts[block_hash] - num_pins
        if remaining > 0:
            self._pin_counts[block_hash] = remaining
            return
        del self._pin_counts[block_hash]
        self._evictable[block_hash] = None


def _excluding(block_hashes: Iterable[BlockHash], keep: set[BlockHash]) -> Iterable[BlockHash]:
    return (block_hash for block_hash in block_hashes if block_hash not in keep)
