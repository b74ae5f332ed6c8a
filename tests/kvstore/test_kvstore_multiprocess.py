"""Processes share one store: blocks one process put, another reads intact; pins taken in
one process are released from another; nothing stays pinned or mapped at the end."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from kvstore.factory import open_store
from tests.kvstore.kv_helpers import REDIS_BACKENDS, block_data, shm_segments, store_spec
from tests.kvstore.kv_workers import (
    CAPACITY_BLOCKS,
    NUM_OWN_BLOCKS,
    NUM_PROCS,
    NUM_SHARED_BLOCKS,
    TIMEOUT_S,
    own_hashes,
    put_then_read_neighbour,
)


@pytest.mark.parametrize("backend", REDIS_BACKENDS)
def test_processes_read_each_others_blocks(backend: str, redis_url: str, namespace: str) -> None:
    spec = store_spec(backend, redis_url)
    store = open_store(spec, CAPACITY_BLOCKS, namespace=namespace)  # keeps the namespace alive
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(NUM_PROCS)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=put_then_read_neighbour, args=(spec, namespace, i, barrier, results))
        for i in range(NUM_PROCS)
    ]
    for proc in procs:
        proc.start()
    outcomes = sorted(results.get(timeout=TIMEOUT_S) for _ in procs)
    for proc in procs:
        proc.join(TIMEOUT_S)
    assert [proc.exitcode for proc in procs] == [0] * NUM_PROCS
    assert outcomes == [(i, True) for i in range(NUM_PROCS)]

    num_blocks = NUM_SHARED_BLOCKS + NUM_PROCS * NUM_OWN_BLOCKS
    stats = store.stats()
    assert (stats.num_blocks, stats.num_pinned_blocks) == (num_blocks, num_blocks)
    all_own = [h for i in range(NUM_PROCS) for h in own_hashes(i)]
    assert store.get("checker", all_own) == [block_data(h) for h in all_own]
    for owner in ["checker"] + [f"writer-{i}" for i in range(NUM_PROCS)]:
        store.release(owner)
    assert store.stats().num_pinned_blocks == 0
    store.close()
    assert shm_segments(namespace) == []
