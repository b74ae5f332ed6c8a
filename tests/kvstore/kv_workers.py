"""Process bodies for the multi-process KV store tests, kept free of pytest so a spawned
process starts fast."""

from __future__ import annotations

import random
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier, Event

from kvstore.errors import StoreFullError
from kvstore.factory import open_store
from tests.kvstore.kv_helpers import block_data, blocks, chain_hashes

NUM_PROCS = 3
NUM_SHARED_BLOCKS = 4  # a common prompt prefix every process publishes
NUM_OWN_BLOCKS = 6
CAPACITY_BLOCKS = 64
TIMEOUT_S = 60.0
CHURN_POOL_BLOCKS = 24
CHURN_STEPS = 40


def own_hashes(index: int) -> list[bytes]:
    return chain_hashes(NUM_OWN_BLOCKS, salt=f"proc-{index}")


def put_then_read_neighbour(
    spec: str, namespace: str, index: int, barrier: Barrier, results: Queue
) -> None:
    """Puts the shared prefix and its own chain at the same moment as its peers, then reads
    its neighbour's chain and reports whether every byte came back."""
    store = open_store(spec, CAPACITY_BLOCKS, namespace=namespace)
    try:
        shared = chain_hashes(NUM_SHARED_BLOCKS, salt="shared")
        barrier.wait(TIMEOUT_S)
        store.put(f"writer-{index}", blocks(*shared, *own_hashes(index)))
        barrier.wait(TIMEOUT_S)
        wanted = shared + own_hashes((index + 1) % NUM_PROCS)
        data = store.get(f"reader-{index}", wanted)
        store.release(f"reader-{index}")
        results.put((index, data == [block_data(h) for h in wanted]))
    finally:
        store.close()


DYING_OWNERS = ("dying-writer", "dying-reader")


def pin_and_hang(spec: str, namespace: str, shared: list[bytes], ready: Event) -> None:
    """A worker caught mid-transfer: it wrote its own blocks and is reading shared ones,
    holding pins on both, when it is killed (it never releases them)."""
    store = open_store(spec, CAPACITY_BLOCKS, namespace=namespace)
    store.put(DYING_OWNERS[0], blocks(*chain_hashes(4, salt="dying")))
    store.get(DYING_OWNERS[1], shared)
    ready.set()
    time.sleep(TIMEOUT_S)


def churn(spec: str, capacity: int, namespace: str, index: int, results: Queue) -> None:
    """Puts and gets random blocks of a shared pool, holding pins over two steps, so the
    processes together pin more than DRAM holds. Reports (puts done, full puts, errors)."""
    store = open_store(spec, capacity, namespace=namespace)
    pool = chain_hashes(CHURN_POOL_BLOCKS, salt="churn")
    rng = random.Random(index)
    held: list[str] = []
    num_done = num_full = 0
    errors: list[str] = []
    try:
        for step in range(CHURN_STEPS):
            owner = f"churn-{index}-{step}"
            picked = rng.sample(pool, rng.randint(1, 3))
            try:
                store.put(owner, blocks(*picked))
                data = store.get(owner, picked)
                if data != [block_data(h) for h in picked]:
                    errors.append(f"wrong bytes at step {step}")
                num_done += 1
            except StoreFullError:
                num_full += 1
            except Exception as error:  # reported, and the test fails on it
                errors.append(f"{type(error).__name__}: {error}")
            held.append(owner)
            if len(held) > 2:
                store.release(held.pop(0))
        for owner in held:
            store.release(owner)
    finally:
        results.put((num_done, num_full, errors))
        store.close()


def put_and_hang(spec: str, capacity: int, namespace: str, salt: str, ready: Event) -> None:
    """A host that publishes two blocks and then crashes (is killed) without closing."""
    store = open_store(spec, capacity, namespace=namespace)
    store.put("publisher", blocks(*chain_hashes(2, salt=salt)))
    store.release("publisher")
    ready.set()
    time.sleep(TIMEOUT_S)
