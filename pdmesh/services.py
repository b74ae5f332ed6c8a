"""One service (the gateway or a worker) in a process of its own, until SIGTERM / Ctrl-C.

``pdmesh serve ROLE`` runs one from its flags; ``pdmesh up`` starts one such process per
service (``pdmesh/cluster.py``), handing each its ``ServiceSpec`` over stdin (the spec holds
API keys and the mesh secret, which never go on a command line or into the environment).
A child started that way stops when its launcher dies: its stdin ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.config import EngineConfig
from gateway.mesh_model import DeclaredModel
from kvstore.base import KVStore
from kvstore.factory import open_store
from pdmesh.limits import ServingLimits
from pdmesh.mesh import start_gateway, start_worker
from pdmesh.shutdown import drain_gateway, drain_worker
from serving.request_log import configure_logging
from serving.security import SecurityConfig

if TYPE_CHECKING:
    from serving.metrics import ServiceMetrics

#: What a service prints once it serves; a launcher reads the address from it.
LISTENING = "listening on "
#: What a gateway prints before it, with its HTTP API's address.
HTTP_LISTENING = "OpenAI API on http://"
#: How a launcher starts one (not ``-m pdmesh.services``: the spec it unpickles must be this
#: module's class, not a copy in ``__main__``).
CHILD_COMMAND = ("-c", "from pdmesh.services import main; main()")


@dataclass(frozen=True)
class ServiceSpec:
    """Everything one service needs. ``address``'s port 0 picks a free port."""

    role: str  # gateway | prefill | decode | colocated
    engine: EngineConfig
    address: str
    store: str
    security: SecurityConfig = field(repr=False)
    limits: ServingLimits = field(default_factory=ServingLimits)
    metrics_port: int | None = None
    store_capacity_blocks: int = 8192
    #: The gateway's workers.
    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    colocated: tuple[str, ...] = ()
    log_format: str = "text"
    #: The gateway's OpenAI HTTP API port (0: a free one; None: off) and model name.
    http_port: int | None = None
    served_model_name: str | None = None
    #: The gateway shares its ports with other gateway processes (``--gateway-processes``);
    #: it listens for them on ``peer_address`` and asks ``siblings`` (gateway/peers.py).
    reuse_port: bool = False
    peer_address: str | None = None
    siblings: tuple[str, ...] = ()
    #: The gateway: engine flags it was given, checked against its workers' (never applied).
    declared: DeclaredModel = field(default_factory=DeclaredModel)


@dataclass
class RunningService:
    address: str
    stop: Callable[[], Awaitable[None]]
    metrics: ServiceMetrics | None


async def start_service(spec: ServiceSpec) -> RunningService:
    host = spec.address.rsplit(":", 1)[0]
    store = open_store(spec.store, spec.store_capacity_blocks)
    if spec.role == "gateway":
        if not spec.colocated and not (spec.prefill and spec.decode):
            raise ValueError(
                "the gateway needs --prefill-addr and --decode-addr, or --colocated-addr"
            )
        server, core = await start_gateway(
            spec.declared,
            store,
            spec.address,
            list(spec.prefill),
            list(spec.decode),
            list(spec.colocated),
            security=spec.security,
            metrics_port=spec.metrics_port,
            limits=spec.limits,
            http_port=spec.http_port,
            served_model_name=spec.served_model_name,
            reuse_port=spec.reuse_port,
            peer_address=spec.peer_address,
            siblings=spec.siblings,
        )
        if core.http is not None:
            print(f"pdmesh: {HTTP_LISTENING}{host}:{core.http.port}/v1", flush=True)

        async def stop_gateway() -> None:
            await drain_gateway(server, core, spec.limits.drain_timeout_s)
            await server.stop()
            await core.close()
            _close(core.metrics, store)

        return RunningService(f"{host}:{server.port}", stop_gateway, core.metrics)
    worker = await start_worker(
        spec.role,
        spec.engine,
        spec.store,
        spec.address,
        spec.security,
        spec.metrics_port,
        spec.limits,
        spec.store_capacity_blocks,
    )

    async def stop_worker() -> None:
        await drain_worker(worker.server, worker.engine, spec.limits.drain_timeout_s)
        await worker.stop()
        _close(None, store)

    return RunningService(f"{host}:{worker.server.port}", stop_worker, worker.metrics)


def _close(metrics: ServiceMetrics | None, store: KVStore) -> None:
    if metrics is not None:
        metrics.stop()
    store.close()


async def until_signal(stop: Callable[[], Awaitable[None]]) -> None:
    """Waits for SIGINT / SIGTERM, then runs ``stop`` (drain, then stop)."""
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    print("pdmesh: draining, then stopping", flush=True)
    await stop()


def describe_gateway(security: SecurityConfig) -> str:
    """How the public port is protected; never a key itself."""
    keys = len(security.api_keys)
    public = f"{keys} API key(s) required" if keys else "public API open (no API key set)"
    return f"{public}, {'TLS' if security.is_public_tls else 'plaintext'}"


def describe_workers(security: SecurityConfig, generated_secret: bool) -> str:
    """How the internal ports are protected; never the secret itself."""
    secret = "generated for this process" if generated_secret else "configured"
    return f"mesh secret {secret}{', mutual TLS' if security.is_mesh_tls else ''}"


def event_loop_policy() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def serve(spec: ServiceSpec, describe: str) -> None:
    """Runs ``spec``'s service in this process until a signal, printing where it listens."""

    async def main() -> None:
        service = await start_service(spec)
        print(f"pdmesh: {spec.role}: {describe}", flush=True)
        if service.metrics is not None:
            host = spec.address.rsplit(":", 1)[0]
            print(f"pdmesh: metrics on http://{host}:{service.metrics.port}/metrics", flush=True)
        print(f"pdmesh: {spec.role} {LISTENING}{service.address}", flush=True)
        await until_signal(service.stop)

    configure_logging(spec.log_format)
    event_loop_policy()
    asyncio.run(main())


def _stop_with_parent() -> None:
    """The launcher holds our stdin open: when it ends, drain and stop as on SIGTERM."""
    sys.stdin.buffer.read()
    os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    """A child of ``pdmesh up`` (``CHILD_COMMAND``); its spec comes on stdin."""
    spec, describe = pickle.load(sys.stdin.buffer)
    assert isinstance(spec, ServiceSpec)
    threading.Thread(target=_stop_with_parent, daemon=True).start()
    code = 0
    try:
        serve(spec, describe)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)  # not through interpreter shutdown: the stdin thread is still reading
