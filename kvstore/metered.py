"""A store handle that counts its traffic in Prometheus metrics (bytes, blocks and time per
path and direction, prefix lookups), for whichever process moves the blocks."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from kvstore.base import KVStore, StoreStats
from kvstore.base import StoreMetrics as KVStoreMetrics
from kvstore.block_hash import BlockHash

#: Latency buckets (seconds) from 1 ms to 10 min: CPU runs are slow, GPU runs fast.
LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0,
)  # fmt: skip


class StoreMetrics:
    """KV store traffic of one service: bytes and time per path and direction, hits/misses."""

    def __init__(self, registry: CollectorRegistry, path: str) -> None:
        self.path = path
        self.bytes = Counter(
            "pdmesh_kv_transfer_bytes",
            "KV block bytes moved between this service and the store",
            ["path", "direction"],
            registry=registry,
        )
        self.blocks = Counter(
            "pdmesh_kv_transfer_blocks",
            "KV blocks moved between this service and the store",
            ["path", "direction"],
            registry=registry,
        )
        self.seconds = Histogram(
            "pdmesh_kv_transfer_seconds",
            "Time of one store put (publish) or get (load) call",
            ["path", "direction"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.lookups = Counter(
            "pdmesh_kv_store_lookup_blocks",
            "Prompt blocks looked up in the store: hit (held) or miss (not held)",
            ["result"],
            registry=registry,
        )
        for direction in ("put", "get"):  # so a scrape shows zeros before the first transfer
            for metric in (self.bytes, self.blocks, self.seconds):
                metric.labels(path, direction)
        self.lookups.labels("hit")
        self.lookups.labels("miss")


class MeteredStore(KVStore):
    """A KV store handle that counts what passes through it for one service's metrics.

    Each service wraps the (possibly shared) store on its own, so the counts are per service.
    Only the ``KVStore`` contract is timed; anything else is passed through unchanged.
    """

    def __init__(self, store: KVStore, metrics: StoreMetrics) -> None:
        self.inner = store
        self.meter = metrics
        self.path = metrics.path

    @property
    def block_path(self) -> str:
        return self.inner.block_path

    def __getattr__(self, name: str) -> Any:  # extra methods of a concrete store
        return getattr(self.inner, name)

    def _record(self, direction: str, data: Iterable[bytes], started: float) -> None:
        sizes = [len(d) for d in data]
        metrics = self.meter
        metrics.seconds.labels(self.path, direction).observe(time.perf_counter() - started)
        metrics.bytes.labels(self.path, direction).inc(sum(sizes))
        metrics.blocks.labels(self.path, direction).inc(len(sizes))

    def put(self, owner: str, blocks: Sequence[tuple[BlockHash, bytes]]) -> None:
        started = time.perf_counter()
        self.inner.put(owner, blocks)
        self._record("put", (data for _, data in blocks), started)

    def match_prefix(self, hashes: Sequence[BlockHash]) -> int:
        matched = self.inner.match_prefix(hashes)
        self.meter.lookups.labels("hit").inc(matched)
        self.meter.lookups.labels("miss").inc(len(hashes) - matched)
        return matched

    def get(self, owner: str, hashes: Sequence[BlockHash]) -> list[bytes]:
        started = time.perf_counter()
        data = self.inner.get(owner, hashes)
        self._record("get", data, started)
        return data

    def release(self, owner: str) -> None:
        self.inner.release(owner)

    def stats(self) -> StoreStats:
        return self.inner.stats()

    # The contract's optional methods have defaults in KVStore, which __getattr__ would never
    # reach: pass them on explicitly.
    def locate(self, block_hash: BlockHash) -> str | None:
        return self.inner.locate(block_hash)

    def renew(self, owner: str) -> bool:
        return self.inner.renew(owner)

    def metrics(self) -> KVStoreMetrics:
        return self.inner.metrics()

    def close(self) -> None:  # the store's owner closes it, not each service's view of it
        pass


def store_path(store: KVStore) -> str:
    """The ``path`` label of a store's traffic: its implementation (embedded, redis, ...)."""
    if store.block_path == "shared-memory":
        return "shm"
    name = type(store).__name__
    return name.removesuffix("KVStore").lower() or name
