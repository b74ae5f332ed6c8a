"""Faults against a real redis-server: a worker killed while holding pins, Redis going away
and coming back, and processes overfilling the tiers at once. Afterwards no block stays
pinned, no owner keeps a lease, and no segment or file outlives the index."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from kvstore.base import KVStore
from kvstore.errors import StoreUnavailableError
from kvstore.factory import open_store
from kvstore.redis_store import RedisKVStore
from tests.kvstore.kv_helpers import block_data, blocks, chain_hashes, shm_segments, store_spec
from tests.kvstore.kv_workers import (
    CAPACITY_BLOCKS,
    CHURN_STEPS,
    DYING_OWNERS,
    NUM_PROCS,
    TIMEOUT_S,
    churn,
    pin_and_hang,
)
from tests.redis_server import start_redis, stop_redis


def _wait_until_unpinned(store: KVStore, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while store.stats().num_pinned_blocks and time.monotonic() < deadline:
        time.sleep(0.1)


def _assert_nothing_leaked(store: RedisKVStore, namespace: str) -> None:
    """Every segment and file is one the index names, and nothing is pinned."""
    metrics = store.metrics()
    assert metrics.num_owners == 0
    assert [t.num_pinned_blocks for t in metrics.tiers] == [0] * len(metrics.tiers)
    assert len(shm_segments(namespace)) == metrics.tier("dram").num_blocks
    disk_blocks = metrics.tier("disk").num_blocks if len(metrics.tiers) > 1 else 0
    assert len(store.disk_files()) == disk_blocks


@pytest.mark.parametrize("disk_blocks", [0, 4])
def test_pins_of_a_killed_worker_expire_and_are_reclaimed(
    redis_url: str, namespace: str, disk_blocks: int
) -> None:
    spec = f"{store_spec('redis+shm', redis_url)}?disk_blocks={disk_blocks}&lease_ttl_s=2"
    store = open_store(spec, CAPACITY_BLOCKS, namespace=namespace)
    assert isinstance(store, RedisKVStore)
    shared = chain_hashes(2, salt="shared")
    store.put("publisher", blocks(*shared))
    store.release("publisher")
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    worker = ctx.Process(target=pin_and_hang, args=(spec, namespace, shared, ready))
    worker.start()
    assert ready.wait(TIMEOUT_S)
    assert store.stats().num_pinned_blocks == 6
    worker.kill()
    worker.join(TIMEOUT_S)

    _wait_until_unpinned(store, timeout_s=15.0)
    metrics = store.metrics()
    assert (metrics.expired_owners, metrics.num_owners) == (len(DYING_OWNERS), 0)
    assert store.stats().num_pinned_blocks == 0
    assert not store.renew(DYING_OWNERS[0])
    # Every block the dead worker pinned is evictable: the whole DRAM can be refilled.
    fresh = chain_hashes(CAPACITY_BLOCKS, salt="fresh")
    store.put("next", blocks(*fresh))
    assert store.get("next", fresh[-1:]) == [block_data(fresh[-1])]
    store.release("next")
    _assert_nothing_leaked(store, namespace)
    store.close()  # the dead worker's handle does not keep the namespace alive
    assert shm_segments(namespace) == []
    assert store.disk_files() == []


def test_redis_restart_gives_clear_errors_then_a_consistent_empty_store(namespace: str) -> None:
    proc, url = start_redis()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    spec = f"{store_spec('redis+shm', url)}?disk_blocks=2"
    store = open_store(spec, 2, namespace=namespace)
    assert isinstance(store, RedisKVStore)
    try:
        a, b, c = chain_hashes(3)
        store.put("r1", blocks(a, b))
        store.release("r1")
        store.put("r2", blocks(c))  # b moves down to disk
        assert [store.locate(h) for h in (a, b, c)] == ["dram", "disk", "dram"]
        stop_redis(proc)
        for operation in (
            lambda: store.put("r3", blocks(a)),
            lambda: store.get("r3", [a]),
            lambda: store.release("r2"),
            store.stats,
        ):
            with pytest.raises(StoreUnavailableError, match="unreachable"):
                operation()

        proc, _ = start_redis(port=port)
        # Redis kept nothing: the store is empty and consistent, not half there.
        assert store.stats().num_blocks == 0
        assert store.match_prefix([a, b, c]) == 0
        store.put("r4", blocks(a, c))
        assert store.get("r5", [c, a]) == [block_data(c), block_data(a)]
        store.release("r4")
        store.release("r5")
        # Bytes the lost index named (a, c in shared memory, b on disk) are orphans now.
        assert len(shm_segments(namespace)) == 4
        assert store.sweep_orphans(min_age_s=0) == 3
        _assert_nothing_leaked(store, namespace)
        store.close()
        assert shm_segments(namespace) == [] and store.disk_files() == []
    finally:
        stop_redis(proc)


def test_processes_overfilling_the_tiers_complete_or_fail_clearly_and_leak_nothing(
    redis_url: str, namespace: str
) -> None:
    dram, disk = 6, 6
    spec = f"{store_spec('redis+shm', redis_url)}?disk_blocks={disk}"
    store = open_store(spec, dram, namespace=namespace)
    assert isinstance(store, RedisKVStore)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=churn, args=(spec, dram, namespace, i, results))
        for i in range(NUM_PROCS)
    ]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=TIMEOUT_S * 2) for _ in procs]
    for proc in procs:
        proc.join(TIMEOUT_S)
    assert [proc.exitcode for proc in procs] == [0] * NUM_PROCS
    assert [errors for _, _, errors in outcomes] == [[]] * NUM_PROCS
    num_done = sum(done for done, _, _ in outcomes)
    num_full = sum(full for _, full, _ in outcomes)
    assert num_done + num_full == NUM_PROCS * CHURN_STEPS
    assert num_done > 0 and num_full > 0, "the load must both succeed and overflow"

    metrics = store.metrics()
    assert metrics.tier("dram").num_blocks <= dram
    assert metrics.tier("disk").num_blocks <= disk
    assert metrics.demotions > 0
    _assert_nothing_leaked(store, namespace)
    store.close()
    assert shm_segments(namespace) == [] and store.disk_files() == []


def test_an_unreachable_store_maps_to_grpc_unavailable() -> None:
    import grpc

    from serving.rpc import status_for

    code, message = status_for(StoreUnavailableError("KV store index is unreachable"))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert message == "KV store unavailable: KV store index is unreachable"
