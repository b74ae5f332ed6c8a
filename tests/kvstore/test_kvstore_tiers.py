"""Tiers on exact blocks: DRAM victims move down to disk least recently used first, a full
disk drops its oldest unpinned block, a get brings a disk block back up, capacities hold,
pinned blocks never move out, and leases of silent owners expire. Every tiered backend must
give the same answer block for block (the embedded store is the reference)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from kvstore.base import KVStore, StoreStats
from kvstore.embedded import EmbeddedKVStore
from kvstore.errors import StoreFullError
from kvstore.factory import open_store
from kvstore.leases import LeaseKeeper
from kvstore.redis_store import RedisKVStore
from tests.kvstore.kv_helpers import block_data, blocks, chain_hashes, shm_segments, store_spec

TIER_BACKENDS = ("embedded", "redis", "redis+shm")
OpenTiered = Callable[..., KVStore]


@pytest.fixture(params=TIER_BACKENDS)
def open_tiered(request: pytest.FixtureRequest, namespace: str) -> Iterator[OpenTiered]:
    """``open_tiered(dram, disk, lease_ttl_s="none")`` opens a store of this backend with
    those tier capacities; at the end every handle is closed and no file or segment may
    remain."""
    backend = str(request.param)
    url = "" if backend == "embedded" else request.getfixturevalue("redis_url")
    stores: list[KVStore] = []

    def open_(dram: int, disk: int, lease_ttl_s: str = "none") -> KVStore:
        spec = f"{store_spec(backend, url)}?disk_blocks={disk}&lease_ttl_s={lease_ttl_s}"
        store = open_store(spec, dram, namespace=namespace)
        stores.append(store)
        return store

    yield open_
    leftovers = []
    for store in stores:
        assert isinstance(store, (EmbeddedKVStore, RedisKVStore))
        store.close()
        leftovers += store.disk_files()
    assert leftovers == []
    assert shm_segments(namespace) == []


def tiers_of(store: KVStore, hashes: list[bytes]) -> list[str | None]:
    return [store.locate(h) for h in hashes]


def occupancy(store: KVStore) -> dict[str, tuple[int, int]]:
    """tier -> (blocks, pinned blocks)."""
    return {t.name: (t.num_blocks, t.num_pinned_blocks) for t in store.metrics().tiers}


def test_dram_victims_move_down_least_recently_used_first_and_a_full_disk_drops(
    open_tiered: OpenTiered,
) -> None:
    store = open_tiered(dram=2, disk=2)
    a, b, c, d, e = chain_hashes(5)
    store.put("r1", blocks(a, b))
    store.release("r1")  # DRAM queue: b, a (a chain's tail first)
    store.put("r2", blocks(c))
    assert tiers_of(store, [a, b, c]) == ["dram", "disk", "dram"]
    store.release("r2")  # DRAM queue: a, c
    store.put("r3", blocks(d, e))  # a then c move down; the full disk drops its oldest, b
    assert tiers_of(store, [a, b, c, d, e]) == ["disk", None, "disk", "dram", "dram"]
    metrics = store.metrics()
    assert (metrics.demotions, metrics.evictions, metrics.promotions) == (3, 1, 0)
    assert occupancy(store) == {"dram": (2, 2), "disk": (2, 0)}
    assert store.stats() == StoreStats(num_blocks=4, num_pinned_blocks=2, capacity_blocks=2)


def test_a_get_promotes_a_disk_block_swapping_down_the_oldest_dram_block(
    open_tiered: OpenTiered,
) -> None:
    store = open_tiered(dram=2, disk=2)
    a, b, c, d = chain_hashes(4)
    store.put("r1", blocks(a, b))
    store.release("r1")  # DRAM queue: b, a
    store.put("r2", blocks(c, d))  # b, a move down (disk queue: b, a)
    store.release("r2")  # DRAM queue: d, c
    assert store.get("r3", [a]) == [block_data(a)]  # a up, d (oldest in DRAM) down
    assert tiers_of(store, [a, b, c, d]) == ["dram", "disk", "dram", "disk"]
    assert occupancy(store) == {"dram": (2, 1), "disk": (2, 0)}
    assert store.get("r3", [b, d]) == [block_data(b), block_data(d)]
    # b up, swapping c (the only unpinned DRAM block) down; then DRAM is all pinned: d stays.
    assert tiers_of(store, [a, b, c, d]) == ["dram", "dram", "disk", "disk"]
    metrics = store.metrics()
    assert (metrics.promotions, metrics.demotions, metrics.evictions) == (2, 4, 0)
    assert (metrics.hits, metrics.misses) == (3, 0)
    store.release("r3")  # d unpinned on disk, b and a queue in DRAM
    assert occupancy(store) == {"dram": (2, 0), "disk": (2, 0)}


def test_pinned_blocks_never_leave_their_tier(open_tiered: OpenTiered) -> None:
    store = open_tiered(dram=1, disk=1)
    a, b, c, d = chain_hashes(4)
    store.put("r1", blocks(a))
    store.release("r1")
    store.put("r2", blocks(b))  # a down to disk
    assert store.get("r3", [a]) == [block_data(a)]  # DRAM holds only pinned b: a stays down
    assert tiers_of(store, [a, b]) == ["disk", "dram"]
    assert occupancy(store) == {"dram": (1, 1), "disk": (1, 1)}
    store.release("r2")
    store.put("r4", blocks(c))  # b is the victim; the disk holds only pinned a: b is dropped
    assert tiers_of(store, [a, b, c]) == ["disk", None, "dram"]
    with pytest.raises(StoreFullError):  # DRAM holds only pinned c
        store.put("r5", blocks(d))
    assert tiers_of(store, [a, b, c, d]) == ["disk", None, "dram", None]
    assert store.get("r6", [a]) == [block_data(a)]
    store.release("r4")
    assert store.get("r6", [a]) == [block_data(a)]  # now c swaps down, a comes up
    assert tiers_of(store, [a, c]) == ["dram", "disk"]
    for owner in ("r3", "r6"):
        store.release(owner)
    assert store.stats().num_pinned_blocks == 0


def test_random_work_respects_every_capacity_and_returns_exact_bytes(
    open_tiered: OpenTiered,
) -> None:
    store = open_tiered(dram=4, disk=6)
    pool = chain_hashes(16)
    rng = random.Random(7)
    owners: list[str] = []
    for step in range(120):
        owner = f"req-{step}"
        picked = rng.sample(pool, rng.randint(1, 3))
        try:
            if rng.random() < 0.5:
                store.put(owner, blocks(*picked))
            else:
                present = [h for h in picked if store.locate(h) is not None]
                assert store.get(owner, present) == [block_data(h) for h in present]
            owners.append(owner)
        except StoreFullError:
            pass
        if len(owners) > 2:  # at most three requests hold pins at a time
            store.release(owners.pop(0))
        dram, disk = (t.num_blocks for t in store.metrics().tiers)
        assert dram <= 4 and disk <= 6
    for owner in owners:
        store.release(owner)
    metrics = store.metrics()
    assert metrics.num_owners == 0
    assert occupancy(store)["dram"][1] == occupancy(store)["disk"][1] == 0
    assert metrics.demotions > 0 and metrics.promotions > 0 and metrics.evictions > 0


def test_leases_of_silent_owners_expire_and_renewed_ones_do_not(
    open_tiered: OpenTiered,
) -> None:
    store = open_tiered(dram=2, disk=0, lease_ttl_s="2.0")
    a, b = chain_hashes(2)
    store.put("silent", blocks(a))
    store.put("alive", blocks(b))
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:  # well past the silent owner's TTL
        assert store.renew("alive")
        time.sleep(0.1)
    assert not store.renew("silent")
    metrics = store.metrics()
    assert (metrics.expired_owners, metrics.num_owners) == (1, 1)
    assert store.stats().num_pinned_blocks == 1
    # The reclaimed block is evictable again, the renewed one is not.
    (c,) = chain_hashes(1, salt="other")
    store.put("next", blocks(c))
    assert tiers_of(store, [a, b, c]) == [None, "dram", "dram"]


@pytest.mark.parametrize("open_tiered", ["redis"], indirect=True)
def test_a_lease_keeper_keeps_pins_alive_until_dropped(open_tiered: OpenTiered) -> None:
    # TTL 2 s renewed every 0.2 s: a busy CI machine may stall the keeper over a second.
    store = open_tiered(dram=2, disk=0, lease_ttl_s="2.0")
    a, b = chain_hashes(2)
    keeper = LeaseKeeper(store, interval_s=0.2)
    try:
        store.put("long-prefill", blocks(a))
        keeper.hold("long-prefill")
        store.put("forgotten", blocks(b))
        _wait_for(lambda: store.metrics().expired_owners == 1, timeout_s=10.0)
        time.sleep(2.0)  # a TTL more: the kept owner must still hold its pin
        assert store.renew("long-prefill") and not store.renew("forgotten")
        assert tiers_of(store, [a]) == ["dram"] and store.stats().num_pinned_blocks == 1
        keeper.drop("long-prefill")
        _wait_for(lambda: store.stats().num_pinned_blocks == 0, timeout_s=10.0)
        assert store.metrics().expired_owners == 2
    finally:
        keeper.close()


def _wait_for(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_spec_options_are_checked(namespace: str) -> None:
    with pytest.raises(ValueError, match="unknown KV store option"):
        open_store("embedded?disk=3", 4)
    with pytest.raises(ValueError, match="disk_capacity_blocks must be at least 0"):
        open_store("embedded?disk_blocks=-1", 4)
    with pytest.raises(ValueError, match="lease_ttl_s must be positive"):
        open_store("embedded?lease_ttl_s=0", 4)
    store = open_store("embedded?disk_blocks=2&lease_ttl_s=none", 4)
    assert [t.capacity_blocks for t in store.metrics().tiers] == [4, 2]
    store.close()


def test_threads_overfilling_the_tiers_get_exact_bytes_or_store_full(
    open_tiered: OpenTiered,
) -> None:
    store = open_tiered(dram=4, disk=4)
    pool = chain_hashes(12)
    errors: list[BaseException] = []
    num_full = [0]

    def worker(index: int) -> None:
        rng = random.Random(index)
        held: list[str] = []
        try:
            for step in range(20):
                owner = f"thread-{index}-{step}"
                picked = rng.sample(pool, 2)
                try:
                    store.put(owner, blocks(*picked))
                    assert store.get(owner, picked) == [block_data(h) for h in picked]
                except StoreFullError:
                    num_full[0] += 1
                held.append(owner)
                if len(held) > 2:  # three requests of up to two blocks: more than DRAM holds
                    store.release(held.pop(0))
            for owner in held:
                store.release(owner)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert num_full[0] > 0, "the load must overflow DRAM"
    metrics = store.metrics()
    assert metrics.num_owners == 0
    assert [t.num_pinned_blocks for t in metrics.tiers] == [0, 0]
    assert metrics.tier("dram").num_blocks <= 4 and metrics.tier("disk").num_blocks <= 4
    assert isinstance(store, (EmbeddedKVStore, RedisKVStore))
    assert len(store.disk_files()) == metrics.tier("disk").num_blocks
