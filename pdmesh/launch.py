"""``pdmesh up`` and ``pdmesh serve``: run services until Ctrl-C / SIGTERM, then stop cleanly."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable

from engine.config import EngineConfig
from engine.kv_transfer import transfer_path
from kvstore.factory import open_store
from pdmesh.mesh import Mesh, MeshConfig, start_gateway, start_worker


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
    print("pdmesh: stopping", flush=True)
    await stop()


def start_local_redis() -> tuple[subprocess.Popen[bytes], str]:
    """A private redis-server on a free loopback port, for ``--store redis`` with no URL."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise FileNotFoundError("--store redis needs redis-server on PATH, or give a redis:// URL")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [
            executable,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--loglevel",
            "warning",
        ],
    )
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    for _ in range(100):
        try:
            redis.Redis.from_url(url).ping()
            return process, url
        except redis.ConnectionError:
            time.sleep(0.05)
    process.terminate()
    raise RuntimeError("redis-server did not start")


def run_up(args: argparse.Namespace, engine: EngineConfig) -> int:
    redis_process = None
    if args.store in ("redis", "redis+shm"):
        redis_process, url = start_local_redis()
        scheme = "redis+shm" if args.store == "redis+shm" else "redis"
        args.store = url.replace("redis", scheme, 1)
        print(f"pdmesh: started redis-server at {url}", flush=True)
    try:
        return _run_mesh(args, engine)
    finally:
        if redis_process is not None:
            redis_process.terminate()
            redis_process.wait(timeout=10)


def _run_mesh(args: argparse.Namespace, engine: EngineConfig) -> int:
    config = MeshConfig(
        engine=engine,
        host=args.host,
        gateway_port=args.port,
        num_prefill=args.prefill,
        num_decode=args.decode,
        store=args.store,
        store_capacity_blocks=args.store_capacity_blocks,
        colocated=args.colocated,
        prefill_tp=args.prefill_tp,
        decode_tp=args.decode_tp,
    )

    async def main() -> None:
        mesh = Mesh(config)
        await mesh.start()
        for worker in mesh.workers:
            print(f"pdmesh: {worker.role} worker on {worker.address}", flush=True)
        print(
            f"pdmesh: gateway listening on {mesh.gateway_address} (store: {config.store}, "
            f"hand-off path: {transfer_path(mesh.store)})",
            flush=True,
        )
        await _until_signal(mesh.stop)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    _event_loop_policy()
    asyncio.run(main())
    return 0


def run_serve(args: argparse.Namespace, engine: EngineConfig) -> int:
    address = f"{args.host}:{args.port}"
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
                engine, store, address, args.prefill_addr, args.decode_addr, args.colocated_addr
            )

            async def stop() -> None:
                await server.stop()
                await core.router.close()
        else:
            worker = await start_worker(args.role, engine, store, address)

            async def stop() -> None:
                await worker.server.stop()
                worker.engine.stop()

        print(f"pdmesh: {args.role} listening on {address}", flush=True)
        await _until_signal(stop)
        store.close()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    _event_loop_policy()
    asyncio.run(main())
    return 0
