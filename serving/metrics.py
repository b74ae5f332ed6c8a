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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from kvstore.base import KVStore
from kvstore.errors import KVStoreError
from kvstore.metered import LATENCY_BUCKETS, MeteredStore, StoreMetrics, store_path

if TYPE_CHECKING:
    from engine.core.client import EngineCoreClient
    from engine.core.messages import StepBatch

logger = logging.getLogger(__name__)

TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServiceMetrics:
    """A registry, the RPC and store metrics every service has, and the HTTP server that
    exposes them."""

    def __init__(self, service: str, store: KVStore | None) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        #: This service's store traffic; None where another process moves the blocks.
        self.store = StoreMetrics(self.registry, store_path(store)) if store else None
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
        assert self.store is not None
        return MeteredStore(store, self.store)

    def rpc_started(self, method: str) -> float:
        self.rpc_in_flight.labels(method).inc()
        return time.perf_counter()

    def rpc_finished(self, method: str, code: str, started: float) -> None:
        self.rpc_in_flight.labels(method).dec()
        self.rpc_requests.labels(method, code).inc()
        self.rpc_seconds.labels(method).observe(time.perf_counter() - started)


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


class StoreGauges(Collector):
    """The store's occupancy at scrape time; a store that cannot be reached gives
    ``pdmesh_kv_store_up 0`` and no occupancy (the scrape itself still answers)."""

    NAMES = (
        ("pdmesh_kv_store_blocks", "Blocks in the store", "num_blocks"),
        ("pdmesh_kv_store_pinned_blocks", "Store blocks pinned by requests", "num_pinned_blocks"),
        ("pdmesh_kv_store_capacity_blocks", "Store capacity", "capacity_blocks"),
    )

    def __init__(self, store: KVStore) -> None:
        self.store = store

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            stats = self.store.stats()
        except KVStoreError:
            yield GaugeMetricFamily("pdmesh_kv_store_up", "The KV store answers", value=0)
            return
        yield GaugeMetricFamily("pdmesh_kv_store_up", "The KV store answers", value=1)
        for name, help_text, field in self.NAMES:
            yield GaugeMetricFamily(name, help_text, value=float(getattr(stats, field)))

    def describe(self) -> Iterable[GaugeMetricFamily]:
        yield GaugeMetricFamily("pdmesh_kv_store_up", "The KV store answers")
        for name, help_text, _ in self.NAMES:
            yield GaugeMetricFamily(name, help_text)


class WorkerStates(Collector):
    """``pdmesh_gateway_workers{role, state}``: the gateway's workers by state; ``refused``
    ones serve another KV namespace than the mesh's and are never routed to."""

    NAME = "pdmesh_gateway_workers"
    HELP = "Workers of the gateway by role and state (serving, unreachable, refused)"

    def __init__(self, read: Callable[[], dict[tuple[str, str], int]]) -> None:
        self.read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["role", "state"])
        for (role, state), count in sorted(self.read().items()):
            family.add_metric([role, state], float(count))
        yield family

    def describe(self) -> Iterable[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=["role", "state"])


class WorkerMetrics(ServiceMetrics):
    """A prefill, decode or colocated worker: its queue, batch, KV cache and store traffic."""

    def __init__(self, service: str) -> None:
        super().__init__(service, None)  # the engine core counts store traffic: relayed
        self.relayed = RelayedMetrics()
        self.registry.register(self.relayed)
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

    def watch(self, core: EngineCoreClient) -> None:
        """Live gauges of ``core`` and a hook on its step reports."""
        core.batch_observers.append(self.observe_batch)

        def field(name: str) -> Callable[[], float]:
            return lambda: float(getattr(core.load(), name))

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
                        "pdmesh_healthy", "1 while the worker serves", lambda: float(core.healthy)
                    ),
                ]
            )
        )

    def observe_batch(self, batch: StepBatch) -> None:
        """One engine step's report (or an idle load report, which ran no step)."""
        if batch.metrics is not None:
            self.relayed.text = batch.metrics
        if not batch.num_seqs:
            return
        self.steps.inc()
        self.step_batch_size.observe(batch.num_seqs)
        for num_tokens in batch.prefill_chunk_tokens:
            self.prefill_chunk_tokens.observe(num_tokens)


class RelayedMetrics(Collector):
    """Metrics another process exposes as text (the engine core's store traffic), shown
    as they were last reported."""

    def __init__(self) -> None:
        self.text = ""

    def collect(self) -> Iterable[Metric]:
        yield from text_string_to_metric_families(self.text)


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

    def watch(
        self,
        num_running: Callable[[], int],
        store: KVStore,
        worker_states: Callable[[], dict[tuple[str, str], int]] | None = None,
    ) -> None:
        """``worker_states``: (role, state) -> workers in it (serving, unreachable, refused)."""
        if worker_states is not None:
            self.registry.register(WorkerStates(worker_states))
        self.registry.register(
            LiveGauges(
                [
                    _LiveGauge(
                        "pdmesh_num_requests_running",
                        "Requests in flight at the gateway",
                        lambda: float(num_running()),
                    )
                ]
            )
        )
        self.registry.register(StoreGauges(store))

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
