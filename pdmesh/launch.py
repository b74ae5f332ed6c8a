"""``pdmesh up`` and ``pdmesh serve``: run services until Ctrl-C / SIGTERM, then stop cleanly."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

from engine.config import EngineConfig
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


def run_up(args: argparse.Namespace, engine: EngineConfig) -> int:
    config = MeshConfig(
        engine=engine,
        host=args.host,
        gateway_port=args.port,
        num_prefill=args.prefill,
        num_decode=args.decode,
        store=args.store,
        store_capacity_blocks=args.store_capacity_blocks,
    )

    async def main() -> None:
        mesh = Mesh(config)
        await mesh.start()
        for worker in mesh.workers:
            print(f"pdmesh: {worker.role} worker on {worker.address}", flush=True)
        print(
            f"pdmesh: gateway listening on {mesh.gateway_address} (store: {config.store})",
            flush=True,
        )
        await _until_signal(mesh.stop)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    _event_loop_policy()
    asyncio.run(main())
    return 0


def run_serve(args: argparse.Namespace, engine: EngineConfig) -> int:
    address = f"{args.host}:{args.port}"

    async def main() -> None:
        store = open_store(args.store, args.store_capacity_blocks)
        if args.role == "gateway":
            if not args.prefill_addr or not args.decode_addr:
                raise ValueError("the gateway needs --prefill-addr and --decode-addr")
            server, core = await start_gateway(
                engine, store, address, args.prefill_addr, args.decode_addr
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
