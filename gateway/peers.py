"""Gateway processes sharing one port reach each other for Abort.

The kernel gives each connection to one of the processes, so an Abort may arrive at a
process that does not run the request (another connection of the same API key, a grpcurl
call). Each process then also listens on a private Unix socket (in a directory only this
user can enter) where its siblings ask it to abort a request of a given owner; an Abort
unknown here is asked of every sibling. A sibling never forwards further.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from gateway.service import GatewayCore
from pdmesh.v1 import generation_pb2 as gen_pb
from pdmesh.v1 import generation_pb2_grpc as gen_grpc

logger = logging.getLogger(__name__)

#: Binary metadata: an owner name may hold any character (a certificate's common name).
OWNER_KEY = "x-pdmesh-owner-bin"
ASK_TIMEOUT_S = 2.0


class PeerAbortServicer(gen_grpc.GenerationServicer):
    """A sibling's question: abort ``owner``'s request here, if it runs here."""

    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    async def Abort(
        self, request: gen_pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> gen_pb.AbortResponse:
        metadata = dict(context.invocation_metadata() or ())
        owner = metadata.get(OWNER_KEY, b"")
        owner_name = owner.decode() if isinstance(owner, bytes) else str(owner)
        return gen_pb.AbortResponse(aborted=self.core.abort(request.request_id, owner_name))


class Siblings:
    """The other gateway processes of this port, asked in turn."""

    def __init__(self, addresses: tuple[str, ...]) -> None:
        self._channels = [grpc.aio.insecure_channel(address) for address in addresses]
        self._stubs = [gen_grpc.GenerationStub(channel) for channel in self._channels]

    async def abort(self, request_id: str, owner: str) -> bool:
        """Whether a sibling ran (and now aborts) ``owner``'s request."""
        if not self._stubs:
            return False
        request = gen_pb.AbortRequest(request_id=request_id)
        metadata = ((OWNER_KEY, owner.encode()),)
        answers = await asyncio.gather(
            *(self._ask(stub, request, metadata) for stub in self._stubs)
        )
        return any(answers)

    @staticmethod
    async def _ask(
        stub: gen_grpc.GenerationStub,
        request: gen_pb.AbortRequest,
        metadata: tuple[tuple[str, bytes], ...],
    ) -> bool:
        try:
            answer = await stub.Abort(request, metadata=metadata, timeout=ASK_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:  # a sibling stopping: it runs nothing
            logger.warning("a sibling gateway did not answer an Abort: %s", error.code().name)
            return False
        return bool(answer.aborted)

    async def close(self) -> None:
        for channel in self._channels:
            with contextlib.suppress(Exception):
                await channel.close()


async def serve_peer_aborts(core: GatewayCore, address: str) -> grpc.aio.Server:
    """The private listener siblings ask (``unix:PATH``)."""
    server = grpc.aio.server()
    gen_grpc.add_GenerationServicer_to_server(PeerAbortServicer(core), server)  # type: ignore[arg-type]
    if server.add_insecure_port(address) == 0:
        raise OSError(f"gateway: cannot listen for sibling gateways on {address}")
    await server.start()
    return server


class PeerLink:
    """This process's listener for its siblings and its channels to theirs."""

    def __init__(self, server: grpc.aio.Server, siblings: Siblings) -> None:
        self.server = server
        self.siblings = siblings

    @classmethod
    async def start(cls, core: GatewayCore, address: str, siblings: tuple[str, ...]) -> PeerLink:
        return cls(await serve_peer_aborts(core, address), Siblings(siblings))

    async def close(self) -> None:
        await self.server.stop(0.5)
        await self.siblings.close()
