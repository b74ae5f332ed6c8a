"""Errors the KV store raises beyond the built-in ``KeyError`` for a missing block.

They live apart from ``kvstore.base`` so the gRPC error mapping can import them without the
store's implementations (``StoreFullError`` maps to RESOURCE_EXHAUSTED).
"""

from __future__ import annotations


class KVStoreError(Exception):
    """Base of every error the store raises on purpose."""


class StoreFullError(KVStoreError):
    """A ``put`` needs more room than eviction can make because the rest is pinned.

    Raised before anything changes: no block of the failed ``put`` is stored or pinned and
    nothing is evicted, so the caller can release other requests and retry.
    """

    def __init__(
        self,
        num_new_blocks: int,
        num_free_blocks: int,
        num_evictable_blocks: int,
        capacity_blocks: int,
    ) -> None:
        self.num_new_blocks = num_new_blocks
        self.num_free_blocks = num_free_blocks
        self.num_evictable_blocks = num_evictable_blocks
        self.capacity_blocks = capacity_blocks
        super().__init__(
            f"KV store full: put needs {num_new_blocks} new blocks but only "
            f"{num_free_blocks} are free and {num_evictable_blocks} evictable of "
            f"{capacity_blocks}; every other block is pinned by a live request"
        )


class StoreUnavailableError(KVStoreError):
    """The store's server cannot be reached (connection refused, lost or timed out).

    Requests that need the store fail with UNAVAILABLE; the handle reconnects by itself
    once the server answers again.
    """
