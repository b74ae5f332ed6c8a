"""Bearer tokens on the wire: a server interceptor that admits only calls carrying one of its
tokens (API keys at the gateway, the mesh secret at a worker), and the client side that
attaches the mesh secret to every call the gateway makes to a worker.

Health and reflection stay open on every port: load balancers and orchestrators probe health
without credentials (as they do vLLM's and TGI's ``/health``), and reflection only describes
the public protos.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from serving.log_limits import ThrottledLog
from serving.request_log import client_interceptors
from serving.rpc import UnauthenticatedError, details_interceptors, with_metadata, wrap_handler
from serving.security import AUTHORIZATION, SecurityConfig

logger = logging.getLogger(__name__)

BEARER = "bearer "
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
ChannelOptions = Sequence[tuple[str, Any]]


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that presents ``token``."""
    return ((AUTHORIZATION, f"Bearer {token}"),)


def presented_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The bearer token of the first ``authorization`` entry: None without one, "" when it
    is not a bearer token (which then matches nothing)."""
    for key, value in metadata or ():
        if key == AUTHORIZATION:
            return bearer_token(value if isinstance(value, str) else "")
    return None


def bearer_token(authorization: str) -> str:
    """The token of an ``authorization`` value ("Bearer TOKEN", any case); "" when it is not
    a bearer token (which then matches nothing)."""
    is_bearer = authorization[: len(BEARER)].lower() == BEARER
    return authorization[len(BEARER) :].strip() if is_bearer else ""


_refusals = ThrottledLog(logger)


def _refusal(handler: grpc.RpcMethodHandler, method: str, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that fails with UNAUTHENTICATED (through the
    error mapping in serving.rpc, which wraps this interceptor)."""

    def refuse(context: grpc.aio.ServicerContext) -> UnauthenticatedError:
        shown = method.encode("unicode_escape").decode()[:200]  # client-chosen: escaped
        _refusals.log(f"{shown} {reason}", "refused %s from %s: %s", shown, context.peer(), reason)
        return UnauthenticatedError(reason)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise refuse(context)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        raise refuse(context)
        yield  # an async generator, like the handler it replaces

    # The body of a refused call is never parsed: a caller without a key learns nothing
    # about it (not even that it would not parse).
    return wrap_handler(handler, lambda _: unary, lambda _: stream, parse=_unread)


def _unread(raw: bytes) -> None:
    return None


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Admits a call whose ``authorization: Bearer TOKEN`` is one of ``tokens``; health and
    reflection need none."""

    def __init__(self, tokens: frozenset[str], what: str) -> None:
        if not tokens:
            raise ValueError("an auth interceptor needs at least one token")
        self._tokens = [token.encode() for token in tokens]
        self._what = what

    def _is_known(self, presented: str) -> bool:
        candidate = presented.encode()
        # Compare with every token, in constant time each, so timing tells nothing of which
        # (or how much of one) matched.
        matches = [hmac.compare_digest(candidate, token) for token in self._tokens]
        return any(matches)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        presented = presented_token(details.invocation_metadata)
        if presented is None:
            return _refusal(handler, method, f"missing {self._what} (authorization: Bearer ...)")
        if not self._is_known(presented):
            return _refusal(handler, method, f"invalid {self._what}")
        return handler


def gateway_interceptors(security: SecurityConfig) -> list[grpc.aio.ServerInterceptor]:
    if not security.api_keys:
        return []
    return [BearerAuthInterceptor(security.api_keys, "API key")]


def worker_interceptors(security: SecurityConfig) -> list[grpc.aio.ServerInterceptor]:
    if security.mesh_secret is None:
        raise ValueError(
            "an internal worker needs the mesh secret: set PDMESH_MESH_SECRET or "
            "PDMESH_MESH_SECRET_FILE (the same value for the gateway and every worker)"
        )
    return [BearerAuthInterceptor(frozenset([security.mesh_secret]), "mesh secret")]


def worker_channel(
    address: str, options: ChannelOptions, security: SecurityConfig
) -> grpc.aio.Channel:
    """The gateway's channel to a worker: mesh secret on every call, mutual TLS if set."""
    if security.mesh_secret is None:
        raise ValueError(
            "the gateway needs its workers' mesh secret: set PDMESH_MESH_SECRET or "
            "PDMESH_MESH_SECRET_FILE"
        )
    secret = security.mesh_secret
    secret_entries = bearer_metadata(secret)
    interceptors = [
        *details_interceptors(lambda details: with_metadata(details, secret_entries)),
        *client_interceptors(),  # and the request id
    ]
    credentials = security.mesh_channel_credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)
