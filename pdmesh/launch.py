"""``pdmesh up`` and ``pdmesh serve``: run services until Ctrl-C / SIGTERM, then stop cleanly."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from engine.config import EngineConfig
from engine.kv_transfer import transfer_path
from kvstore.factory import open_store
from kvstore.local_redis import start_redis, stop_redis
from pdmesh.limits import ServingLimits
from pdmesh.mesh import Mesh, MeshConfig, start_gateway, start_worker
from pdmesh.request_log import configure_logging
from pdmesh.security import SecurityConfig
from pdmesh.shutdown import drain_gateway, drain_worker

if TYPE_CHECKING:
    from pdmesh.metrics import ServiceMetrics

#: Default first metrics port of ``pdmesh up`` / ``pdmesh serve`` (vLLM serves /metrics on
#: 8000); workers of ``pdmesh up`` take the ports after it, as their gRPC ports do.
DEFAULT_METRICS_PORT = 8000


def resolve_metrics_port(flag: int | None, grpc_port: int) -> int | None:
    """The ``--metrics-port`` a service runs with: the flag (or ``PDMESH_METRICS_PORT``) when
    given, -1 meaning off; otherwise 8000, or free ports when the gRPC port is 0 too."""
    if flag is None:
        flag = int(os.environ.get("PDMESH_METRICS_PORT", "-2"))
        if flag == -2:
            return 0 if grpc_port == 0 else DEFAULT_METRICS_PORT
    if flag < -1 or flag > 65535:
        raise ValueError(f"bad metrics port {flag} (-1 turns metrics off)")
    return None if flag == -1 else flag


#: Default OpenAI HTTP port of the gateway (vLLM's and TGI's servers listen on 8000/8080).
DEFAULT_HTTP_PORT = 8080


def resolve_http_port(flag: int | None, grpc_port: int) -> int | None:
    """The gateway's ``--http-port``: the flag (or ``PDMESH_HTTP_PORT``), -1 meaning off;
    otherwise 8080, or a free port when the gRPC port is 0 too."""
    if flag is None:
        flag = int(os.environ.get("PDMESH_HTTP_PORT", "-2"))
        if flag == -2:
            return 0 if grpc_port == 0 else DEFAULT_HTTP_PORT
    if flag < -1 or flag > 65535:
        raise ValueError(f"bad HTTP port {flag} (-1 turns the HTTP API off)")
    return None if flag == -1 else flag


def _event_loop_policy() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _until_signal(stop: Callable[[], Awaitable[None]]) -> None:
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


def run_up(args: argparse.Namespace, engine: EngineConfig, security: SecurityConfig) -> int:
    redis_process = None
    if args.store in ("redis", "redis+shm"):
        redis_process, url = start_redis()
        scheme = "redis+shm" if args.store == "redis+shm" else "redis"
        args.store = url.replace("redis", scheme, 1)
        print(f"pdmesh: started redis-server at {url}", flush=True)
    try:
        return _run_mesh(args, engine, security)
    finally:
        if redis_process is not None:
            stop_redis(redis_process)


def _run_mesh(args: argparse.Namespace, engine: EngineConfig, security: SecurityConfig) -> int:
    config = MeshConfig(
        engine=engine,
        host=args.host,
        worker_host=args.worker_host,
        gateway_port=args.port,
        num_prefill=args.prefill,
        num_decode=args.decode,
        store=args.store,
        store_capacity_blocks=args.store_capacity_blocks,
        colocated=args.colocated,
        prefill_tp=args.prefill_tp,
        decode_tp=args.decode_tp,
        security=security,
        metrics_port=resolve_metrics_port(args.metrics_port, args.port),
        limits=limits_from(args),
        prefill_devices=args.prefill_devices,
        decode_devices=args.decode_devices,
        http_port=resolve_http_port(args.http_port, args.port),
        served_model_name=args.served_model_name,
    )

    async def main() -> None:
        mesh = Mesh(config)
        await mesh.start()
        generated = security.mesh_secret is None
        print(
            f"pdmesh: gateway: {describe_gateway(mesh.security)}; "
            f"workers: {describe_workers(mesh.security, generated)}",
            flush=True,
        )
        for worker in mesh.workers:
            print(f"pdmesh: {worker.role} worker on {worker.address}", flush=True)
        if mesh.http_address is not None:
            print(f"pdmesh: gateway OpenAI API on http://{mesh.http_address}/v1", flush=True)
        for name, port in mesh.metrics_ports.items():
            print(f"pdmesh: {name} metrics on http://{config.host}:{port}/metrics", flush=True)
        print(
            f"pdmesh: gateway listening on {mesh.gateway_address} (store: {config.store}, "
            f"hand-off path: {transfer_path(mesh.store)})",
            flush=True,
        )
        await _until_signal(mesh.stop)

    configure_logging(args.log_format)
    _event_loop_policy()
    asyncio.run(main())
    return 0


def limits_from(args: argparse.Namespace) -> ServingLimits:
    return ServingLimits.build(
        {
            "max_in_flight": args.max_in_flight,
            "max_waiting": args.max_waiting,
            "max_request_bytes": args.max_request_bytes,
            "drain_timeout_s": args.drain_timeout,
        }
    )


def run_serve(args: argparse.Namespace, engine: EngineConfig, security: SecurityConfig) -> int:
    address = f"{args.host}:{args.port}"
    if security.mesh_secret is None:  # fail before loading anything
        raise ValueError(
            f"pdmesh serve {args.role} needs the mesh secret shared by the gateway and its "
            "workers: set PDMESH_MESH_SECRET or PDMESH_MESH_SECRET_FILE (or --mesh-secret-file)"
        )
    metrics_port = resolve_metrics_port(args.metrics_port, args.port)
    limits = limits_from(args)
    if args.role in ("prefill", "decode") and args.store == "embedded":
        # The embedded store lives in one process: a worker alone in its own could hand off
        # to no one. `pdmesh up` is the in-process layout.
        raise ValueError(
            f"a {args.role} worker in its own process needs a store shared with the others: "
            "--store redis+shm://HOST:PORT/DB (same host, shared memory) or "
            "redis://HOST:PORT/DB (any host)"
        )

    async def main() -> None:
        store = open_store(args.store, args.store_capacity_blocks)
        if args.role == "gateway":
            if not args.colocated_addr and not (args.prefill_addr and args.decode_addr):
                raise ValueError(
                    "the gateway needs --prefill-addr and --decode-addr, or --colocated-addr"
                )
            server, core = await start_gateway(
                engine,
                store,
                address,
                args.prefill_addr,
                args.decode_addr,
                args.colocated_addr,
                security=security,
                metrics_port=metrics_port,
                limits=limits,
                http_port=resolve_http_port(args.http_port, args.port),
                served_model_name=args.served_model_name,
            )
            metrics: ServiceMetrics | None = core.metrics
            if core.http is not None:
                print(f"pdmesh: OpenAI API on http://{args.host}:{core.http.port}/v1", flush=True)

            async def stop() -> None:
                await drain_gateway(server, core, limits.drain_timeout_s)
                await server.stop()
                await core.router.close()
        else:
            worker = await start_worker(
                args.role,
                engine,
                args.store,
                address,
                security,
                metrics_port,
                limits,
                args.store_capacity_blocks,
            )
            metrics = worker.metrics

            async def stop() -> None:
                await drain_worker(worker.server, worker.engine, limits.drain_timeout_s)
                await worker.stop()

        is_gateway = args.role == "gateway"
        described = describe_gateway(security) if is_gateway else describe_workers(security, False)
        print(f"pdmesh: {args.role}: {described}", flush=True)
        if metrics is not None:
            print(f"pdmesh: metrics on http://{args.host}:{metrics.port}/metrics", flush=True)
        print(f"pdmesh: {args.role} listening on {address}", flush=True)
        await _until_signal(stop)
        if metrics is not None:
            metrics.stop()
        store.close()

    configure_logging(args.log_format)
    _event_loop_policy()
    asyncio.run(main())
    return 0
