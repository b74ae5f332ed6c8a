"""``pdmesh up`` (every service of a local mesh, each in its process) and ``pdmesh serve``
(one service): run until Ctrl-C / SIGTERM, then drain and stop cleanly."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from engine.config import EngineConfig
from gateway.mesh_model import DeclaredModel
from kvstore.local_redis import start_redis, stop_redis
from pdmesh.cluster import START_TIMEOUT_S, GatewayGroup, LocalCluster
from pdmesh.limits import ServingLimits
from pdmesh.mesh import MeshConfig, service_metrics_port
from pdmesh.services import ServiceSpec, describe_gateway, describe_workers, serve
from serving.request_log import configure_logging
from serving.security import SecurityConfig

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
        gateway_processes=args.gateway_processes,
    )
    configure_logging(args.log_format)
    cluster = LocalCluster(config, args.log_format)
    stopping = _stop_on_signal()
    try:
        cluster.start()
        generated = security.mesh_secret is None
        print(
            f"pdmesh: gateway: {describe_gateway(cluster.security)}; "
            f"workers: {describe_workers(cluster.security, generated)}",
            flush=True,
        )
        for worker in cluster.workers:
            print(f"pdmesh: {worker.role} worker on {worker.address}", flush=True)
        print(
            f"pdmesh: gateway listening on {cluster.gateway_address} (store: {config.store}, "
            f"{len(cluster.workers) + config.gateway_processes} service processes)",
            flush=True,
        )
        while not stopping.wait(0.5):
            gone = cluster.exited()
            if gone is not None and gone.role == "gateway":
                print("pdmesh: the gateway exited; stopping", file=sys.stderr, flush=True)
                return 1
            if gone is not None:  # the gateway's router already took it out of service
                print(f"pdmesh: {gone.name} exited", file=sys.stderr, flush=True)
                cluster.workers.remove(gone)
        print("pdmesh: draining, then stopping", flush=True)
        return 0
    finally:
        cluster.stop()


def _stop_on_signal() -> threading.Event:
    """Set by SIGINT or SIGTERM: the launcher then stops its children in order."""
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    return stopping


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
    if security.mesh_secret is None:  # fail before loading anything
        raise ValueError(
            f"pdmesh serve {args.role} needs the mesh secret shared by the gateway and its "
            "workers: set PDMESH_MESH_SECRET or PDMESH_MESH_SECRET_FILE (or --mesh-secret-file)"
        )
    if args.role in ("prefill", "decode") and args.store == "embedded":
        # The embedded store lives in one process: a worker alone in its own could hand off
        # to no one. `pdmesh up` starts a shared one.
        raise ValueError(
            f"a {args.role} worker in its own process needs a store shared with the others: "
            "--store redis+shm://HOST:PORT/DB (same host, shared memory) or "
            "redis://HOST:PORT/DB (any host)"
        )
    spec = ServiceSpec(
        role=args.role,
        engine=engine,
        address=f"{args.host}:{args.port}",
        store=args.store,
        security=security,
        limits=limits_from(args),
        metrics_port=resolve_metrics_port(args.metrics_port, args.port),
        store_capacity_blocks=args.store_capacity_blocks,
        prefill=tuple(args.prefill_addr),
        decode=tuple(args.decode_addr),
        colocated=tuple(args.colocated_addr),
        log_format=args.log_format,
        http_port=resolve_http_port(args.http_port, args.port) if args.role == "gateway" else None,
        served_model_name=args.served_model_name,
        declared=declared_from(args),
    )
    is_gateway = args.role == "gateway"
    if is_gateway and args.gateway_processes > 1:
        return _serve_gateways(spec, args.gateway_processes)
    serve(spec, describe_gateway(security) if is_gateway else describe_workers(security, False))
    return 0


def declared_from(args: argparse.Namespace) -> DeclaredModel:
    """The engine flags (or ``PDMESH_*`` variables) given to a gateway: it checks them
    against its workers and uses the workers' values."""
    return DeclaredModel(
        model=args.model or os.environ.get("PDMESH_MODEL") or None,
        dtype=args.dtype or os.environ.get("PDMESH_DTYPE") or None,
        max_model_len=args.max_model_len,
    )


def _serve_gateways(spec: ServiceSpec, count: int) -> int:
    """``serve gateway --gateway-processes N``: N gateway processes on the spec's ports,
    children of this one, until a signal (or one of them exits)."""
    configure_logging(spec.log_format)
    group = GatewayGroup(describe_gateway(spec.security))
    stopping = _stop_on_signal()
    ports = [service_metrics_port(spec.metrics_port, index) for index in range(count)]
    try:
        group.start(spec, ports, time.monotonic() + START_TIMEOUT_S)
        print(f"pdmesh: {count} gateway processes listening on {group.address}", flush=True)
        while not stopping.wait(0.5):
            if any(child.process.poll() is not None for child in group.children):
                print("pdmesh: a gateway process exited; stopping", file=sys.stderr, flush=True)
                return 1
        return 0
    finally:
        group.stop(spec.limits.drain_timeout_s + 30)
