"""Process bodies for the multi-process KV store tests, kept free of pytest so a spawned
process starts fast."""

from __future__ import annotations

from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

from kvstore.factory import open_store
from tests.kvstore.kv_helpers import block_data, blocks, chain_hashes

NUM_PROCS = 3
NUM_SHARED_BLOCKS = 4  # a common prompt prefix every process publishes
NUM_OWN_BLOCKS = 6
CAPACITY_BLOCKS = 64
TIMEOUT_S = 60.0


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
