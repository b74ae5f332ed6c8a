"""Starting services: one worker, the gateway, or a whole mesh whose services share this
process (``Mesh``: tests and embedding; each engine core still runs in a process of its own
and every hop crosses a real socket). ``pdmesh up`` runs each service in a process of its
own instead (``pdmesh/cluster.py``); ``pdmesh serve ROLE`` runs one, as a container would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import subprocess
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from decode_svc.service import ColocatedServicer, DecodeServicer
from engine.config import CPU_THREADS_ENV, EngineConfig
from engine.core.client import EngineCoreClient
from engine.tokenizer import load_tokenizer
from gateway.admission import Admission
from gateway.mesh_model import DeclaredModel, adopt, tokenizer_source
from gateway.openai_api import HTTPConfig
from gateway.openai_server import OpenAIServer
from gateway.peers import PeerLink
from gateway.router import Router
from gateway.service import GatewayCore, GenerationServicer
from gateway.store_watch import StoreWatch
from kvstore.base import KVStore
from kvstore.factory import open_store
from kvstore.local_redis import start_redis, stop_redis
from pdmesh.limits import ServingLimits
from pdmesh.shutdown import drain_gateway
from pdmesh.v1 import generation_pb2_grpc as gen_grpc
from pdmesh.v1 import worker_pb2_grpc as worker_grpc
from prefill_svc.service import PrefillServicer
from serving.auth import gateway_interceptors, worker_channel, worker_interceptors
from serving.request_log import RequestCalls, ServiceInterceptor
from serving.rpc import Server
from serving.security import SecurityConfig

if TYPE_CHECKING:
    from serving.metrics import WorkerMetrics

logger = logging.getLogger(__name__)

ROLES = ("prefill", "decode")
GATEWAY_SERVICE = "pdmesh.v1.Generation"
WORKER_SERVICES = {
    "prefill": "pdmesh.v1.PrefillWorker",
    "decode": "pdmesh.v1.DecodeWorker",
    "colocated": "pdmesh.v1.ColocatedWorker",
}


@dataclass(frozen=True)
class MeshConfig:
    """A whole local mesh. Workers listen on consecutive ports after the gateway's."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    #: The gateway's (public) listen address.
    host: str = "127.0.0.1"
    #: The workers' listen address: loopback keeps them off the network (the gateway of
    #: this process dials them on 127.0.0.1).
    worker_host: str = "127.0.0.1"
    #: Gateway port; 0 picks free ports for every service (tests).
    gateway_port: int = 50051
    num_prefill: int = 1
    num_decode: int = 1
    #: "embedded", "redis://host:port/db" or "redis+shm://host:port/db".
    store: str = "embedded"
    store_capacity_blocks: int = 8192
    #: One engine per worker does both roles (``num_prefill`` such workers, no decode pool).
    colocated: bool = False
    #: Tensor-parallel ranks of each prefill / decode worker.
    prefill_tp: int = 1
    decode_tp: int = 1
    #: API keys, mesh secret, TLS. Without a mesh secret, the Mesh generates one.
    security: SecurityConfig = field(default_factory=SecurityConfig)
    #: First /metrics HTTP port (the gateway's; workers take the next ones); 0 picks free
    #: ports; None serves no metrics.
    metrics_port: int | None = None
    #: Overload bounds, request size limit and drain timeout.
    limits: ServingLimits = field(default_factory=ServingLimits)
    #: GPUs the prefill (or colocated) / decode workers run on, taken in turn; None: the
    #: engine's device for all. Workers on one GPU split ``gpu_memory_utilization``.
    prefill_devices: tuple[int, ...] | None = None
    decode_devices: tuple[int, ...] | None = None
    #: The gateway's OpenAI HTTP port on ``host`` (0: a free one; None: no HTTP API).
    http_port: int | None = None
    #: The model name of the HTTP API (None: the model's file or directory name).
    served_model_name: str | None = None
    #: Gateway processes sharing the gateway's ports (``pdmesh up`` only; the in-process
    #: Mesh of tests runs one). Each streams about 20k tokens/s before its loop saturates.
    gateway_processes: int = 1

    def __post_init__(self) -> None:
        if self.gateway_processes < 1:
            raise ValueError(f"gateway_processes must be at least 1, got {self.gateway_processes}")
        if self.num_prefill < 1 or (self.num_decode < 1 and not self.colocated):
            raise ValueError("a mesh needs at least one prefill and one decode worker")
        if not 0 <= self.gateway_port < 65536:
            raise ValueError(f"bad port {self.gateway_port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"bad metrics port {self.metrics_port}")

    def worker_port(self, index: int) -> int:
        return 0 if self.gateway_port == 0 else self.gateway_port + 1 + index

    @property
    def roles(self) -> list[str]:
        if self.colocated:
            return ["colocated"] * self.num_prefill
        return ["prefill"] * self.num_prefill + ["decode"] * self.num_decode

    def placements(self) -> list[Placement]:
        """Where each worker (in ``roles`` order) runs, with its share of its GPU."""
        devices: list[int | None] = []
        seen: dict[str, int] = {}
        for role in self.roles:
            pool = self.decode_devices if role == "decode" else self.prefill_devices
            index = seen[role] = seen.get(role, -1) + 1
            devices.append(None if not pool else pool[index % len(pool)])
        share = self.engine.cache.gpu_memory_utilization
        # CPU engines split the cores: each using all of them, they would thrash each other.
        threads = None
        if self.engine.device == "cpu":
            threads = max(1, (os.cpu_count() or 1) // len(devices))
        return [
            Placement(device, share / devices.count(device), devices.count(device) > 1, threads)
            for device in devices
        ]


@dataclass(frozen=True)
class Placement:
    """One worker's GPU (None: the engine's device as configured) and memory share."""

    device: int | None
    gpu_memory_utilization: float
    shared: bool
    #: CPU engines: the worker's share of this host's cores (None: not a CPU engine).
    cpu_threads: int | None = None

    def env(self) -> dict[str, str]:
        env = {} if self.device is None else {"CUDA_VISIBLE_DEVICES": str(self.device)}
        if self.cpu_threads is not None and CPU_THREADS_ENV not in os.environ:
            env[CPU_THREADS_ENV] = str(self.cpu_threads)
        return env

    def engine(self, config: EngineConfig, tp: int) -> EngineConfig:
        cache = dataclasses.replace(
            config.cache, gpu_memory_utilization=self.gpu_memory_utilization
        )
        device = config.device if self.device is None else "cuda"  # the one GPU it sees
        return dataclasses.replace(config, device=device, tensor_parallel_size=tp, cache=cache)


def warn_shared_devices(config: MeshConfig) -> None:
    """Two processes on one GPU time-slice it: a prefill's long forward passes stall the
    decode worker's steps. Allowed (one GPU, a laptop), never silent."""
    if not config.engine.device.startswith("cuda") or config.colocated:
        return
    places = config.placements()
    prefill = {p.device for r, p in zip(config.roles, places, strict=True) if r == "prefill"}
    decode = {p.device for r, p in zip(config.roles, places, strict=True) if r == "decode"}
    for device in prefill & decode:
        logger.warning(
            "a prefill and a decode worker share GPU %s: they time-slice it (decode steps "
            "wait behind prefill passes) and split its memory; give them their own with "
            "--prefill-devices / --decode-devices",
            "(default)" if device is None else device,
        )


def service_metrics_port(first: int | None, index: int) -> int | None:
    """Service ``index``'s metrics port (0 the gateway, then workers) when the first service
    serves on ``first``: None stays off, 0 stays 0 (a free port each), N gives N + index."""
    if first is None or first == 0:
        return first
    return first + index


@dataclass
class WorkerHandle:
    role: str
    server: Server
    engine: EngineCoreClient
    #: The host a local client dials (its listen host, or loopback for a wildcard).
    host: str = "127.0.0.1"
    metrics: WorkerMetrics | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.server.port}"

    async def stop(self) -> None:
        await self.server.stop()
        await self.engine.stop()
        if self.metrics is not None:
            self.metrics.stop()


SERVICERS = {
    "prefill": (PrefillServicer, worker_grpc.add_PrefillWorkerServicer_to_server),
    "decode": (DecodeServicer, worker_grpc.add_DecodeWorkerServicer_to_server),
    "colocated": (ColocatedServicer, worker_grpc.add_ColocatedWorkerServicer_to_server),
}


async def start_worker(
    role: str,
    config: EngineConfig,
    store: str,
    address: str,
    security: SecurityConfig,
    metrics_port: int | None = None,
    limits: ServingLimits | None = None,
    store_capacity_blocks: int = 8192,
    env: dict[str, str] | None = None,
) -> WorkerHandle:
    """A worker (its servicer here, its engine core in a process of its own) that admits
    only callers holding ``security.mesh_secret`` (required). ``store``: the spec of the
    store its engine opens. ``metrics_port``: serve /metrics there (0: a free port; None:
    no metrics). ``env``: the engine core's environment additions (device placement)."""
    metrics = None
    if metrics_port is not None:  # prometheus_client is imported only where metrics are on
        from serving.metrics import WorkerMetrics

        metrics = WorkerMetrics(role)
        metrics.serve(metrics_port, address.rsplit(":", 1)[0])  # a taken port fails at once
    server = Server(
        address,
        [WORKER_SERVICES[role]],
        worker_interceptors(security),
        security.mesh_server_credentials(),
        outer_interceptors=[ServiceInterceptor(role, metrics)],
    )
    await server.start()  # health answers NOT_SERVING while the model loads
    loop = asyncio.get_running_loop()

    def on_lost() -> None:  # health turns NOT_SERVING
        asyncio.run_coroutine_threadsafe(server.set_not_serving(), loop)

    core = EngineCoreClient(
        config,
        role,
        None if role == "colocated" else store,
        store_capacity_blocks,
        name=f"{role}-{server.port}",
        # Never fewer than one full batch: a burst of --max-num-seqs requests must queue.
        max_waiting=max((limits or ServingLimits()).max_waiting, config.scheduler.max_num_seqs),
        on_lost=on_lost,
        env=env,
        metrics=metrics is not None,
    )
    try:
        await core.start()
    except BaseException:
        await server.stop(0)
        await core.stop()
        raise
    if metrics is not None:
        metrics.watch(core)
    servicer, add = SERVICERS[role]
    calls = RequestCalls(role, servicer.METHOD, metrics)
    add(servicer(core, calls), server.late)  # type: ignore[operator]
    await server.set_serving()
    logger.info("%s worker serving on port %d", role, server.port)
    host = address.rsplit(":", 1)[0]
    wildcard = host in ("", "0.0.0.0", "::", "[::]")
    return WorkerHandle(role, server, core, "127.0.0.1" if wildcard else host, metrics)


async def start_gateway(
    declared: DeclaredModel,
    store: KVStore,
    address: str,
    prefill: list[str],
    decode: list[str],
    colocated: list[str] | None = None,
    *,
    security: SecurityConfig,
    metrics_port: int | None = None,
    limits: ServingLimits | None = None,
    http_port: int | None = None,
    served_model_name: str | None = None,
    reuse_port: bool = False,
    peer_address: str | None = None,
    siblings: tuple[str, ...] = (),
) -> tuple[Server, GatewayCore]:
    """The gateway: API keys (if any) on its port, the mesh secret on its calls to workers.
    Its model, KV namespace and limits are its workers' (it waits until one answers);
    ``declared``: engine flags given to the gateway, checked against them, never applied.
    ``metrics_port``: serve /metrics there (0: a free port; None: no metrics); the metrics
    are ``core.metrics``. ``http_port``: the OpenAI HTTP API there too, on the same core
    (``core.http``; 0: a free port; None: none)."""
    limits = limits or ServingLimits()
    metrics = None
    if metrics_port is not None:
        from serving.metrics import GatewayMetrics

        metrics = GatewayMetrics("gateway", store)
        metrics.serve(metrics_port, address.rsplit(":", 1)[0])

    def listen() -> Server:
        return Server(
            address,
            [GATEWAY_SERVICE],
            gateway_interceptors(security),
            security.public_server_credentials(),
            outer_interceptors=[ServiceInterceptor("gateway", metrics, True)],
            max_request_bytes=limits.max_request_bytes,
            reuse_port=reuse_port,
        )

    # Alone, the gateway listens at once (health answers NOT_SERVING while it loads). One of
    # several on a shared port binds it only when ready: the kernel hands connections to any
    # process bound there, and one still loading would keep them waiting or refuse them.
    server = None if reuse_port else listen()
    if server is not None:
        await server.start()
    if metrics is not None:
        store = metrics.metered(store)
    router = Router(
        prefill,
        decode,
        colocated,
        open_channel=functools.partial(worker_channel, security=security),
    )
    await router.start()
    # The model, KV namespace and limits are the workers': the gateway runs no engine.
    model = await adopt(router, declared)
    source = tokenizer_source(model, declared)
    tokenizer = await asyncio.to_thread(load_tokenizer, source)
    core = GatewayCore(tokenizer, model, router, store, Admission(limits.max_in_flight))
    if metrics is not None:
        core.metrics = metrics
        metrics.watch(lambda: len(core.running), store, router.worker_states)
    ask_siblings = None
    if peer_address is not None:  # one of several gateway processes on this port
        peers = await PeerLink.start(core, peer_address, siblings)
        core.closers.append(peers.close)
        ask_siblings = peers.siblings.abort
    servicer = GenerationServicer(core, ask_siblings)
    if server is None:
        server = listen()
        await server.start()
    gen_grpc.add_GenerationServicer_to_server(servicer, server.late)  # type: ignore[arg-type]
    if http_port is not None:
        http = HTTPConfig(
            address.rsplit(":", 1)[0], http_port, served_model_name,
            security.api_keys, limits.max_request_bytes, reuse_port,
        )  # fmt: skip
        core.http = OpenAIServer(core, http)
        await core.http.start()
    await server.set_serving()
    watch_store(server, core)
    logger.info("gateway serving on port %d", server.port)
    return server, core


def watch_store(server: Server, core: GatewayCore) -> None:
    """Health follows the store: NOT_SERVING while it cannot be reached (and not draining);
    the watch stops with the core."""

    async def changed(available: bool) -> None:
        core.store_available = available
        if core.admission.is_draining:
            return
        await (server.set_serving() if available else server.set_not_serving())

    watch = StoreWatch(core.store, changed)
    watch.start()
    core.closers.append(watch.close)


class Mesh:
    """Gateway and worker services in this process, each engine core in its own, and a
    store they all share. The embedded store becomes a private redis-server with block
    bytes in shared memory (engine cores are separate processes): no external server."""

    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.security = config.security.with_mesh_secret()
        self.store_spec = config.store
        self._redis: subprocess.Popen[bytes] | None = None
        if config.store == "embedded":
            self._redis, url = start_redis()
            self.store_spec = url.replace("redis://", "redis+shm://", 1)
        self.store = open_store(self.store_spec, config.store_capacity_blocks)
        self.workers: list[WorkerHandle] = []
        self.gateway: Server | None = None
        self.core: GatewayCore | None = None

    @property
    def gateway_address(self) -> str:
        assert self.gateway is not None
        return f"{self.config.host}:{self.gateway.port}"

    async def start(self) -> None:
        config = self.config
        roles, places = config.roles, config.placements()
        tp = {
            "prefill": config.prefill_tp,
            "decode": config.decode_tp,
            "colocated": config.prefill_tp,
        }
        warn_shared_devices(config)

        async def one(index: int, role: str) -> WorkerHandle:
            address = f"{config.worker_host}:{config.worker_port(index)}"
            port = service_metrics_port(config.metrics_port, 1 + index)
            return await start_worker(
                role,
                places[index].engine(config.engine, tp[role]),
                self.store_spec,
                address,
                self.security,
                port,
                config.limits,
                config.store_capacity_blocks,
                env=places[index].env(),
            )

        # The engines load their models at the same time, each in its own process.
        self.workers = list(await asyncio.gather(*(one(i, r) for i, r in enumerate(roles))))
        self.gateway, self.core = await start_gateway(
            DeclaredModel(),
            self.store,
            f"{config.host}:{config.gateway_port}",
            [w.address for w in self.workers if w.role == "prefill"],
            [w.address for w in self.workers if w.role == "decode"],
            [w.address for w in self.workers if w.role == "colocated"],
            security=self.security,
            metrics_port=service_metrics_port(config.metrics_port, 0),
            limits=config.limits,
            http_port=config.http_port,
            served_model_name=config.served_model_name,
        )

    @property
    def http_address(self) -> str | None:
        """HOST:PORT of the gateway's OpenAI HTTP API (None when it has none)."""
        http = self.core.http if self.core is not None else None
        return None if http is None else f"{self.config.host}:{http.port}"

    @property
    def metrics_ports(self) -> dict[str, int]:
        """Service name (gateway, prefill-0, decode-0, ...) -> its /metrics port."""
        ports: dict[str, int] = {}
        if self.core is not None and self.core.metrics and self.core.metrics.port:
            ports["gateway"] = self.core.metrics.port
        counts: dict[str, int] = {}
        for worker in self.workers:
            index = counts[worker.role] = counts.get(worker.role, -1) + 1
            if worker.metrics is not None and worker.metrics.port:
                ports[f"{worker.role}-{index}"] = worker.metrics.port
        return ports

    async def stop(self) -> None:
        """Drains the gateway (health NOT_SERVING, new requests refused, running ones
        finish within ``limits.drain_timeout_s``), then stops every service."""
        if self.gateway is not None and self.core is not None:
            await drain_gateway(self.gateway, self.core, self.config.limits.drain_timeout_s)
        if self.gateway is not None:
            await self.gateway.stop()
        if self.core is not None:
            await self.core.close()
            if self.core.metrics is not None:
                self.core.metrics.stop()
        await asyncio.gather(*(worker.stop() for worker in self.workers))
        self.store.close()
        if self._redis is not None:
            stop_redis(self._redis)
