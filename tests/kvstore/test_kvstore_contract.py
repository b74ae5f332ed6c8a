"""The ``KVStore`` contract, checked on exact blocks for every backend: embedded, Redis with
block bytes in Redis, and Redis with block bytes in shared memory; and the embedded and
Redis-with-shared-memory stores with a disk tier below DRAM. Tests that observe which block
leaves the store run on single-tier stores only (with a disk tier the block moves down
instead: ``test_kvstore_tiers`` checks that order)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from kvstore.base import KVStore, StoreStats
from kvstore.errors import StoreFullError
from tests.kvstore.kv_helpers import (
    SINGLE_TIER_BACKENDS,
    block_data,
    blocks,
    chain_hashes,
    present,
)

MakeStore = Callable[[int], KVStore]
single_tier = pytest.mark.parametrize("backend", SINGLE_TIER_BACKENDS)


def test_put_stores_pins_and_get_returns_the_bytes(make_store: MakeStore) -> None:
    store = make_store(8)
    a, b, c = chain_hashes(3)
    store.put("req-1", blocks(a, b, c))
    assert store.stats() == StoreStats(num_blocks=3, num_pinned_blocks=3, capacity_blocks=8)
    assert store.get("req-2", [c, a]) == [block_data(c), block_data(a)]


def test_release_leaves_exactly_the_other_owners_pins(make_store: MakeStore) -> None:
    store = make_store(8)
    a, b, c = chain_hashes(3)
    store.put("req-1", blocks(a, b, c))
    store.get("req-2", [c, a])
    store.release("req-1")
    assert store.stats() == StoreStats(num_blocks=3, num_pinned_blocks=2, capacity_blocks=8)
    store.release("req-2")
    assert store.stats() == StoreStats(num_blocks=3, num_pinned_blocks=0, capacity_blocks=8)


def test_match_prefix_counts_leading_blocks_only(make_store: MakeStore) -> None:
    store = make_store(8)
    a, b, c, d = chain_hashes(4)
    store.put("req", blocks(a, c))
    assert store.match_prefix([]) == 0
    assert store.match_prefix([a, b, c]) == 1
    assert store.match_prefix([b, a]) == 0
    store.put("req", blocks(b))
    assert store.match_prefix([a, b, c, d]) == 3
    assert store.match_prefix([a, b, c]) == 3


def test_get_of_a_missing_block_raises_and_pins_nothing(make_store: MakeStore) -> None:
    store = make_store(8)
    a, b, c = chain_hashes(3)
    store.put("writer", blocks(a, b))
    store.release("writer")
    with pytest.raises(KeyError, match=c.hex()):
        store.get("reader", [a, c, b])
    assert store.stats().num_pinned_blocks == 0
    assert store.get("reader", []) == []
    assert store.stats().num_pinned_blocks == 0


def test_repeated_pins_by_one_owner_go_with_one_release(make_store: MakeStore) -> None:
    store = make_store(8)
    a, b = chain_hashes(2)
    store.put("req", blocks(a, b))
    store.put("req", blocks(a))
    store.get("req", [a, a, b])
    assert store.stats().num_pinned_blocks == 2
    store.release("req")
    assert store.stats().num_pinned_blocks == 0


@single_tier
def test_a_block_stays_pinned_until_every_owner_releases(make_store: MakeStore) -> None:
    store = make_store(2)
    a, b, c = chain_hashes(3)
    store.put("req-1", blocks(a))
    store.put("req-2", blocks(a))
    store.get("req-3", [a])
    for owner in ("req-1", "req-3"):
        store.release(owner)
        assert store.stats().num_pinned_blocks == 1
        # Still pinned: room for b, but not for b and c by evicting a.
        with pytest.raises(StoreFullError):
            store.put("other", blocks(b, c))
    store.release("req-2")
    store.put("other", blocks(b, c))
    assert present(store, [a, b, c]) == [b, c]


def test_release_is_idempotent_and_ignores_unknown_owners(make_store: MakeStore) -> None:
    store = make_store(4)
    (a,) = chain_hashes(1)
    store.release("nobody")
    store.put("req", blocks(a))
    store.release("req")
    store.release("req")
    assert store.stats() == StoreStats(num_blocks=1, num_pinned_blocks=0, capacity_blocks=4)


@single_tier
def test_eviction_takes_the_least_recently_released_and_a_chains_tail_first(
    make_store: MakeStore,
) -> None:
    store = make_store(4)
    a, b, c, d = chain_hashes(4)
    e, f, g = chain_hashes(3, salt="other")
    store.put("req-1", blocks(a, b, c))
    store.put("req-2", blocks(d))
    store.release("req-1")  # evictable, oldest first: c, b, a (the shared prefix goes last)
    store.release("req-2")  # then d
    store.put("req-3", blocks(e))
    assert present(store, [a, b, c, d, e]) == [a, b, d, e]
    store.put("req-3", blocks(f, g))
    assert present(store, [a, b, c, d, e, f, g]) == [d, e, f, g]


@single_tier
def test_get_makes_a_block_recently_used(make_store: MakeStore) -> None:
    store = make_store(3)
    a, b, c = chain_hashes(3)
    d, e = chain_hashes(2, salt="other")
    store.put("req-1", blocks(a, b, c))
    store.release("req-1")  # evictable: c, b, a
    store.get("req-2", [c])
    store.release("req-2")  # evictable: b, a, c
    store.put("req-3", blocks(d, e))
    assert present(store, [a, b, c, d, e]) == [c, d, e]


@single_tier
def test_put_never_evicts_a_block_it_is_about_to_pin(make_store: MakeStore) -> None:
    store = make_store(2)
    a, b = chain_hashes(2)
    (c,) = chain_hashes(1, salt="other")
    store.put("req-1", blocks(a))
    store.put("req-2", blocks(b))
    store.release("req-1")
    store.release("req-2")  # evictable: a (oldest), b
    store.put("req-3", blocks(a, c))
    assert present(store, [a, b, c]) == [a, c]
    assert store.stats().num_pinned_blocks == 2


def test_pinned_blocks_are_never_evicted_and_a_full_put_changes_nothing(
    make_store: MakeStore,
) -> None:
    store = make_store(2)
    a, b = chain_hashes(2)
    (c,) = chain_hashes(1, salt="other")
    store.put("req-1", blocks(a, b))
    with pytest.raises(StoreFullError) as excinfo:
        store.put("req-2", blocks(a, c))
    error = excinfo.value
    assert (error.num_new_blocks, error.num_free_blocks, error.num_evictable_blocks) == (1, 0, 0)
    assert error.capacity_blocks == 2
    assert present(store, [a, b, c]) == [a, b]
    assert store.stats() == StoreStats(num_blocks=2, num_pinned_blocks=2, capacity_blocks=2)
    store.release("req-1")
    # req-2's failed put pinned nothing, a included.
    assert store.stats().num_pinned_blocks == 0


def test_a_full_put_evicts_nothing_even_when_some_blocks_are_evictable(
    make_store: MakeStore,
) -> None:
    store = make_store(3)
    a, b, c = chain_hashes(3)
    d, e = chain_hashes(2, salt="other")
    store.put("req-1", blocks(a, b))
    store.put("req-2", blocks(c))
    store.release("req-2")
    with pytest.raises(StoreFullError) as excinfo:
        store.put("req-3", blocks(d, e))
    error = excinfo.value
    assert (error.num_new_blocks, error.num_free_blocks, error.num_evictable_blocks) == (2, 0, 1)
    assert present(store, [a, b, c, d, e]) == [a, b, c]
    assert store.stats() == StoreStats(num_blocks=3, num_pinned_blocks=2, capacity_blocks=3)


def test_a_put_larger_than_the_store_fails_whole(make_store: MakeStore) -> None:
    store = make_store(2)
    hashes = chain_hashes(3)
    with pytest.raises(StoreFullError):
        store.put("req", blocks(*hashes))
    assert store.stats() == StoreStats(num_blocks=0, num_pinned_blocks=0, capacity_blocks=2)


def test_blocks_already_stored_keep_their_bytes(make_store: MakeStore) -> None:
    store = make_store(4)
    a, b = chain_hashes(2)
    store.put("req-1", [(a, b"first"), (a, b"second"), (b, b"")])
    store.put("req-2", [(a, b"third")])
    assert store.stats().num_blocks == 2
    assert store.get("req-3", [a, b]) == [b"first", b""]
    for owner in ("req-1", "req-2", "req-3"):
        store.release(owner)
    assert store.stats().num_pinned_blocks == 0


def test_a_large_block_round_trips(make_store: MakeStore) -> None:
    store = make_store(2)
    (a,) = chain_hashes(1)
    data = bytes(range(256)) * 4096  # 1 MiB, about one block of a small model
    store.put("writer", [(a, data)])
    assert store.get("reader", [a]) == [data]


@single_tier
def test_concurrent_threads_on_one_handle_leave_no_pins(make_store: MakeStore) -> None:
    store = make_store(6)
    pool = chain_hashes(12)
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for step in range(25):
                hash_ = pool[(index * 5 + step) % len(pool)]
                owner = f"thread-{index}-{step}"
                store.put(owner, blocks(hash_))
                assert store.get(owner, [hash_]) == [block_data(hash_)]
                store.release(owner)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stats = store.stats()
    assert (stats.num_blocks, stats.num_pinned_blocks) == (6, 0)


def test_capacity_must_be_positive(make_store: MakeStore) -> None:
    with pytest.raises(ValueError, match="capacity_blocks"):
        make_store(0)
