"""Starting services: one worker, the gateway, or the whole mesh in one process.

``pdmesh up`` (the default, embedded store) runs every service in this process, each on its
own port with its own gRPC server, so every hop still crosses a real socket; the workers
share an in-process KV store. ``pdmesh serve ROLE`` runs one service, as a container would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass, field

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.engine import Engine, cache_namespace
from engine.model_source import load_model_config, resolve_model
from engine.tokenizer import load_tokenizer
from gateway.admission import Admission
from gateway.router import Router
from gateway.service import GatewayCore, GenerationServicer
from kvstore.base import KVStore
from kvstore.factory import open_store
from pdmesh.limits import ServingLimits
from pdmesh.rpc import Server
from pdmesh.shutdown import drain_gateway
from pdmesh.v1 import generation_pb2_grpc as gen_grpc
from pdmesh.v1 import worker_pb2_grpc as worker_grpc

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
    host: str = "127.0.0.1"
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
    #: Overload bounds, request size limit and drain timeout.
    limits: ServingLimits = field(default_factory=ServingLimits)

    def __post_init__(self) -> None:
        if self.num_prefill < 1 or (self.num_decode < 1 and not self.colocated):
            raise ValueError("a mesh needs at least one prefill and one decode worker")
        # One process holds one tensor-parallel group: in `pdmesh up` (one process) at most
        # one worker may be sharded. Larger layouts run `pdmesh serve ROLE --tp N` per worker.
        sharded = self.num_prefill * (self.prefill_tp > 1) + self.num_decode * (self.decode_tp > 1)
        if sharded > 1:
            raise ValueError(
                "pdmesh up runs at most one tensor-parallel worker; "
                "start sharded workers with `pdmesh serve prefill|decode --tp N`"
            )
        if not 0 <= self.gateway_port < 65536:
            raise ValueError(f"bad port {self.gateway_port}")

    def worker_port(self, index: int) -> int:
        return 0 if self.gateway_port == 0 else self.gateway_port + 1 + index


@dataclass
class WorkerHandle:
    role: str
    server: Server
    engine: AsyncEngine

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"


async def start_worker(
    role: str,
    config: EngineConfig,
    store: KVStore,
    address: str,
    limits: ServingLimits | None = None,
) -> WorkerHandle:
    from decode_svc.service import ColocatedServicer, DecodeServicer
    from prefill_svc.service import PrefillServicer

    server = Server(address, [WORKER_SERVICES[role]])
    await server.start()  # health answers NOT_SERVING while the model loads
    kv_store = None if role == "colocated" else store
    engine = await asyncio.to_thread(Engine, config, kv_store, role == "prefill")
    loop = asyncio.get_running_loop()

    def on_lost() -> None:  # from the engine thread: health turns NOT_SERVING
        asyncio.run_coroutine_threadsafe(server.set_not_serving(), loop)

    async_engine = AsyncEngine(
        engine,
        name=f"{role}-{server.port}",
        on_lost=on_lost,
        max_waiting=(limits or ServingLimits()).max_waiting,
    )
    if role == "prefill":
        worker_grpc.add_PrefillWorkerServicer_to_server(
            PrefillServicer(async_engine), server.server
        )
    elif role == "decode":
        worker_grpc.add_DecodeWorkerServicer_to_server(DecodeServicer(async_engine), server.server)
    else:
        worker_grpc.add_ColocatedWorkerServicer_to_server(
            ColocatedServicer(async_engine), server.server
        )
    await server.set_serving()
    logger.info("%s worker serving on port %d", role, server.port)
    return WorkerHandle(role, server, async_engine)


async def start_gateway(
    config: EngineConfig,
    store: KVStore,
    address: str,
    prefill: list[str],
    decode: list[str],
    colocated: list[str] | None = None,
    limits: ServingLimits | None = None,
) -> tuple[Server, GatewayCore]:
    limits = limits or ServingLimits()
    server = Server(address, [GATEWAY_SERVICE], max_request_bytes=limits.max_request_bytes)
    await server.start()
    source = resolve_model(config.model)
    model_config = load_model_config(source)
    tokenizer = await asyncio.to_thread(load_tokenizer, source)
    router = Router(prefill, decode, colocated)
    await router.start()
    limit = model_config.max_position_embeddings
    core = GatewayCore(
        tokenizer,
        model_config,
        min(config.max_model_len or limit, limit),
        router,
        store,
        source.path.name,
        config.cache.block_size,
        cache_namespace(source, model_config, config),
        Admission(limits.max_in_flight),
    )
    gen_grpc.add_GenerationServicer_to_server(GenerationServicer(core), server.server)
    await server.set_serving()
    logger.info("gateway serving on port %d", server.port)
    return server, core


class Mesh:
    """Gateway + workers + store in this process."""

    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        self.store = open_store(config.store, config.store_capacity_blocks)
        self.workers: list[WorkerHandle] = []
        self.gateway: Server | None = None
        self.core: GatewayCore | None = None

    @property
    def gateway_address(self) -> str:
        assert self.gateway is not None
        return f"{self.config.host}:{self.gateway.port}"

    async def start(self) -> None:
        config = self.config
        roles = ["prefill"] * config.num_prefill + ["decode"] * config.num_decode
        if config.colocated:
            roles = ["colocated"] * config.num_prefill
        tp = {
            "prefill": config.prefill_tp,
            "decode": config.decode_tp,
            "colocated": config.prefill_tp,
        }
        for index, role in enumerate(roles):
            address = f"{config.host}:{config.worker_port(index)}"
            engine = dataclasses.replace(config.engine, tensor_parallel_size=tp[role])
            self.workers.append(
                await start_worker(role, engine, self.store, address, config.limits)
            )
        self.gateway, self.core = await start_gateway(
            config.engine,
            self.store,
            f"{config.host}:{config.gateway_port}",
            [w.address for w in self.workers if w.role == "prefill"],
            [w.address for w in self.workers if w.role == "decode"],
            [w.address for w in self.workers if w.role == "colocated"],
            config.limits,
        )

    async def stop(self) -> None:
        """Drains the gateway (health NOT_SERVING, new requests refused, running ones
        finish within ``limits.drain_timeout_s``), then stops every service."""
        if self.gateway is not None and self.core is not None:
            await drain_gateway(self.gateway, self.core, self.config.limits.drain_timeout_s)
        if self.gateway is not None:
            await self.gateway.stop()
        if self.core is not None:
            await self.core.router.close()
        for worker in self.workers:
            await worker.server.stop()
            worker.engine.stop()
        self.store.close()
