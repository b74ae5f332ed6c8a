"""Graceful shutdown: stop taking requests, let those in flight finish, then stop.

Health turns NOT_SERVING first, so load balancers and the gateway's router move away while
the server still answers; new requests get UNAVAILABLE; running ones get ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from engine.core.client import EngineCoreClient
from gateway.service import GatewayCore
from serving.rpc import Server

logger = logging.getLogger(__name__)

POLL_S = 0.05


async def drain_gateway(server: Server, core: GatewayCore, timeout_s: float) -> None:
    await server.set_not_serving()
    if not await core.admission.drain(timeout_s):
        logger.warning(
            "%d requests still running after %.0f s; stopping anyway",
            core.admission.num_in_flight,
            timeout_s,
        )
    if core.http is not None:  # same drain for both front ends; then HTTP stops listening
        await core.http.stop()


async def drain_worker(server: Server, engine: EngineCoreClient, timeout_s: float) -> None:
    await server.set_not_serving()
    # Out of service: new requests get UNAVAILABLE (a prefill is retried on another worker)
    # and Load fails, so the gateway's router stops choosing this worker.
    engine.drain()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        load = engine.load()
        if load.num_running + load.num_waiting == 0:
            return
        await asyncio.sleep(POLL_S)
    logger.warning("requests still running after %.0f s; stopping anyway", timeout_s)
