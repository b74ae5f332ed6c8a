"""The shared paged KV store's contract.

A block is named by its content hash (``kvstore.block_hash``) and holds the K and V of
``block_size`` tokens for every layer as one opaque byte string (the writer's layout; a
reader of the same namespace knows it). Blocks are pinned by the requests that need them:
a pinned block is never evicted; unpinned blocks stay as a prefix cache until capacity
forces least-recently-used eviction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from kvstore.block_hash import BlockHash


@dataclass(frozen=True)
class StoreStats:
    num_blocks: int
    num_pinned_blocks: int
    capacity_blocks: int


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

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases connections or shared memory held by this handle."""
