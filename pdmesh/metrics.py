"""Prometheus metrics of one service, served on its own HTTP ``/metrics`` port.

Every service owns a ``CollectorRegistry`` (never the process-global one): ``pdmesh up`` runs
the gateway and all workers in one process, each scraped on its own port, and a counter of one
must not show up in another. Gauges that mirror live state (queue depth, KV blocks) are read
at scrape time by a collector, so nothing on the engine thread has to remember to update them.

Names follow vLLM's where one exists (``time_to_first_token_seconds``...), prefixed ``pdmesh_``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kvstore.base import KVStore, StoreStats
from kvstore.base import StoreMetrics as KVStoreMetrics
from kvstore.block_hash import BlockHash

if TYPE_CHECKING:
    from engine.async_engine import AsyncEngine
    from engine.scheduler import ScheduledChunk

logger = logging.getLogger(__name__)

#: Latency buckets (seconds) from 1 ms to 10 min: CPU runs are slow, GPU runs fast.
LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0,
)  # fmt: skip
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServiceMetrics:
    """A registry, the RPC and store metrics every service has, and the HTTP server that
    exposes them."""

    def __init__(self, service: str, store: KVStore) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        self.store = StoreMetrics(self.registry, store_path(store))
        self.rpc_requests = Counter(
            "pdmesh_rpc_requests",
            "RPCs handled, by method and final gRPC status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.rpc_in_flight = Gauge(
            "pdmesh_rpc_in_flight", "RPCs being handled", ["method"], registry=self.registry
        )
        self.rpc_seconds = Histogram(
            "pdmesh_rpc_duration_seconds",
            "RPC handling time (a stream: until its last message)",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.port: int | None = None
        self._http: Any = None

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Starts ``/metrics`` on ``port`` (0 picks a free one); returns the bound port."""
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            where = f"{host}:{port}"
            raise OSError(f"{self.service}: cannot serve metrics on {where}: {error}") from None
        self._http = server
        self.port = int(server.server_port)
        logger.info("%s metrics on http://%s:%d/metrics", self.service, host, self.port)
        return self.port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def metered(self, store: KVStore) -> KVStore:
        """This service's view of ``store``: the same blocks, counted here."""
        return MeteredStore(store, self.store)

    def rpc_started(self, method: str) -> float:
        self.rpc_in_flight.labels(method).inc()
        return time.perf_counter()

    def rpc_finished(self, method: str, code: str, started: float) -> None:
        self.rpc_in_flight.labels(method).dec()
        self.rpc_requests.labels(method, code).inc()
        self.rpc_seconds.labels(method).observe(time.perf_counter() - started)


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
    name = type(store).__name__
    return name.removesuffix("KVStore").lower() or name


@dataclass(frozen=True)
class _LiveGauge:
    name: str
    help: str
    read: Callable[[], float]


class LiveGauges(Collector):
    """Gauges read from live state at scrape time."""

    def __init__(self, gauges: list[_LiveGauge]) -> None:
        self.gauges = gauges

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for gauge in self.gauges:
            yield GaugeMetricFamily(gauge.name, gauge.help, value=gauge.read())

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return self.collect()


class WorkerMetrics(ServiceMetrics):
    """A prefill, decode or colocated worker: its queue, batch, KV cache and store traffic."""

    def __init__(self, service: str, store: KVStore) -> None:
        super().__init__(service, store)
        self.prefill_chunk_tokens = Histogram(
            "pdmesh_prefill_chunk_tokens",
            "Prompt tokens computed per prefill chunk",
            buckets=TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.step_batch_size = Histogram(
            "pdmesh_step_batch_size",
            "Sequences in one engine step (prefill chunks and decodes)",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.steps = Counter(
            "pdmesh_engine_steps", "Engine steps that ran the model", registry=self.registry
        )

    def watch(self, engine: AsyncEngine) -> None:
        """Live gauges of ``engine`` and a hook on its steps."""
        engine.engine.step_observers.append(self.observe_step)

        def field(name: str) -> Callable[[], float]:
            return lambda: float(getattr(engine.load(), name))

        self.registry.register(
            LiveGauges(
                [
                    _LiveGauge("pdmesh_num_requests_waiting", "Queue depth", field("num_waiting")),
                    _LiveGauge(
                        "pdmesh_num_requests_running",
                        "Running batch size",
                        field("num_running"),
                    ),
                    _LiveGauge("pdmesh_kv_blocks_used", "KV blocks used", field("num_used_blocks")),
                    _LiveGauge("pdmesh_kv_blocks_free", "KV blocks free", field("num_free_blocks")),
                    _LiveGauge("pdmesh_kv_blocks_total", "KV blocks", field("num_total_blocks")),
                    _LiveGauge(
                        "pdmesh_outstanding_prefill_tokens",
                        "Prompt tokens not yet computed",
                        field("outstanding_prefill_tokens"),
                    ),
                    _LiveGauge(
                        "pdmesh_healthy", "1 while the worker serves", lambda: float(engine.healthy)
                    ),
                ]
            )
        )

    def observe_step(self, chunks: Sequence[ScheduledChunk]) -> None:
        """Runs on the engine thread after each model step (prometheus_client is thread-safe)."""
        self.steps.inc()
        self.step_batch_size.observe(len(chunks))
        for chunk in chunks:
            if chunk.start < len(chunk.seq.prompt_token_ids):  # a prompt chunk, not a decode
                self.prefill_chunk_tokens.observe(chunk.num_tokens)


class GatewayMetrics(ServiceMetrics):
    """Per-request latencies and outcomes, as the client sees them, plus store gauges."""

    def __init__(self, service: str, store: KVStore) -> None:
        super().__init__(service, store)
        registry = self.registry
        self.requests = Counter(
            "pdmesh_requests",
            "Finished generation requests by outcome: stop, length, abort or error",
            ["status"],
            registry=registry,
        )
        for status in ("stop", "length", "abort", "error"):
            self.requests.labels(status)
        self.ttft = Histogram(
            "pdmesh_time_to_first_token_seconds",
            "Time from request arrival to its first token",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tpot = Histogram(
            "pdmesh_time_per_output_token_seconds",
            "Mean time per output token after the first, per request",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            "pdmesh_e2e_request_latency_seconds",
            "Time from request arrival to its last token",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "pdmesh_prompt_tokens", "Prompt tokens of finished requests", registry=registry
        )
        self.generation_tokens = Counter(
            "pdmesh_generation_tokens", "Tokens generated", registry=registry
        )
        self.cached_tokens = Counter(
            "pdmesh_cached_prompt_tokens", "Prompt tokens served from a cache", registry=registry
        )

    def watch(self, num_running: Callable[[], int], store: KVStore) -> None:
        def stat(name: str) -> Callable[[], float]:
            return lambda: float(getattr(store.stats(), name))

        self.registry.register(
            LiveGauges(
                [
                    _LiveGauge(
                        "pdmesh_num_requests_running",
                        "Requests in flight at the gateway",
                        lambda: float(num_running()),
                    ),
                    _LiveGauge("pdmesh_kv_store_blocks", "Blocks in the store", stat("num_blocks")),
                    _LiveGauge(
                        "pdmesh_kv_store_pinned_blocks",
                        "Store blocks pinned by requests",
                        stat("num_pinned_blocks"),
                    ),
                    _LiveGauge(
                        "pdmesh_kv_store_capacity_blocks",
                        "Store capacity",
                        stat("capacity_blocks"),
                    ),
                ]
            )
        )

    def request_finished(self, status: str, state: Any) -> None:
        """``state`` is the gateway's ``Running`` record of the request."""
        num_tokens = state.num_completion_tokens
        self.requests.labels(status).inc()
        self.prompt_tokens.inc(len(state.request.prompt_token_ids))
        self.generation_tokens.inc(num_tokens)
        self.cached_tokens.inc(state.cached_tokens)
        timings = state.clock.to_pb()  # milliseconds
        if num_tokens:
            self.ttft.observe(timings.time_to_first_token_ms / 1e3)
            self.e2e.observe(timings.total_ms / 1e3)
        if num_tokens > 1:
            self.tpot.observe(timings.mean_time_per_output_token_ms / 1e3)
