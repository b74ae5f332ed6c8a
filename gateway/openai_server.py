"""Serves the OpenAI HTTP API with uvicorn on the gateway's own event loop, next to its
gRPC server: one process, one loop, the same GatewayCore."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn

from gateway.openai_api import HTTPConfig, OpenAIFrontEnd
from gateway.service import GatewayCore

logger = logging.getLogger(__name__)


class _LoopServer(uvicorn.Server):
    """uvicorn without its signal handlers: the process that runs the gateway owns SIGINT
    and SIGTERM (it drains the gateway first, then stops this server)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class OpenAIServer:
    def __init__(self, core: GatewayCore, config: HTTPConfig) -> None:
        self.front_end = OpenAIFrontEnd(core, config)
        self.config = config
        self.port: int | None = None
        self._server: _LoopServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Listens (a taken port fails here, at once) and returns the bound port."""
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        try:
            sock = socket.create_server(
                (self.config.host, self.config.port),
                family=family,
                reuse_port=self.config.reuse_port,
            )
        except OSError as error:
            where = f"{self.config.host}:{self.config.port}"
            raise OSError(f"gateway: cannot serve HTTP on {where}: {error}") from None
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.front_end.app(),
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=5,
        )
        self._server = _LoopServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():  # failed to start: raise its error
                self._task.result()
            await asyncio.sleep(0.01)
        logger.info("gateway OpenAI HTTP API on http://%s:%d/v1", self.config.host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._server = self._task = None
