"""gRPC plumbing every service shares: domain errors to status codes (the one place that
mapping lives), health, reflection, and server start-up."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.errors import (
    InvalidRequestError,
    OverloadedError,
    RequestNotFoundError,
    WorkerLostError,
)
from kvstore.errors import StoreFullError, StoreUnavailableError

logger = logging.getLogger(__name__)


class WorkerUnavailableError(Exception):
    """No healthy worker of the needed role."""


class WorkerStatusError(Exception):
    """A worker's status for one request (its code and message), passed on to the client."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}
#: Calls a server lets wait for a handler before gRPC core starts cancelling new ones.
PENDING_CALLS = 16384


class UnauthenticatedError(Exception):
    """The caller presented no credential, or a wrong one (API key, mesh secret)."""


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """Maps a domain error to a gRPC status code and message."""
    if isinstance(error, grpc.aio.AioRpcError):  # a downstream worker's status passes through
        code = error.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            return grpc.StatusCode.UNAVAILABLE, f"worker unavailable: {error.details()}"
        return code, error.details() or str(code)
    if isinstance(error, WorkerStatusError):
        return STATUS_CODES.get(error.code, grpc.StatusCode.UNKNOWN), error.message
    if isinstance(error, (InvalidRequestError, ValueError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, RequestNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(error)
    if isinstance(error, (OverloadedError, StoreFullError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    if isinstance(error, (WorkerUnavailableError, WorkerLostError)):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    if isinstance(error, UnauthenticatedError):
        return grpc.StatusCode.UNAUTHENTICATED, str(error)
    if isinstance(error, StoreUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, f"KV store unavailable: {error}"
    if isinstance(error, (asyncio.TimeoutError, TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(error) or "deadline exceeded"
    return grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}"


async def _abort_with(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    code, message = status_for(error)
    if code == grpc.StatusCode.INTERNAL:
        logger.exception("internal error", exc_info=error)
    await context.abort(code, message)


class MalformedRequest:
    """Stands in for a request message that could not be parsed, so the handler can answer
    INVALID_ARGUMENT with the reason (gRPC itself would answer UNKNOWN)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(
    deserializer: Callable[[bytes], Any] | None, max_request_bytes: int | None
) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(raw: bytes) -> Any:
        if max_request_bytes is not None and len(raw) > max_request_bytes:
            return MalformedRequest(
                f"the request is {len(raw)} bytes, more than this server's limit of "
                f"{max_request_bytes} (max_request_bytes)"
            )
        try:
            return deserializer(raw)
        except DecodeError as error:  # e.g. a string field that is not valid UTF-8
            return MalformedRequest(f"the request message cannot be parsed: {error}")

    return parse


def _check_parsed(request: Any) -> None:
    if isinstance(request, MalformedRequest):
        raise InvalidRequestError(request.reason)


def _wrap_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            _check_parsed(request)
            return await behavior(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as error:
            await _abort_with(context, error)

    return wrapped


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            _check_parsed(request)
            async for item in behavior(request, context):
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as error:
            await _abort_with(context, error)

    return wrapped


CallDetails: TypeAlias = grpc.aio.ClientCallDetails


def with_metadata(details: CallDetails, extra: Sequence[tuple[str, str]]) -> CallDetails:
    """``details`` with ``extra`` metadata entries added."""
    metadata = grpc.aio.Metadata(*tuple(details.metadata or ()), *extra)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


# grpc.aio files a client interceptor under the first call kind it implements only, so each
# kind has its own class; all three apply one change to the call's details.
class _DetailsUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, change: Callable[[CallDetails], CallDetails]) -> None:
        self.change = change

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: CallDetails, request: Any
    ) -> Any:
        return await continuation(self.change(details), request)


class _DetailsStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, change: Callable[[CallDetails], CallDetails]) -> None:
        self.change = change

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: CallDetails, request: Any
    ) -> Any:
        return await continuation(self.change(details), request)


class _DetailsBidi(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, change: Callable[[CallDetails], CallDetails]) -> None:
        self.change = change

    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: CallDetails, requests: Any
    ) -> Any:
        return await continuation(self.change(details), requests)


def details_interceptors(
    change: Callable[[CallDetails], CallDetails],
) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that apply ``change`` to every call's details, of every kind."""
    return [_DetailsUnary(change), _DetailsStream(change), _DetailsBidi(change)]


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    unary: Callable[[Callable[..., Any]], Callable[..., Any]],
    stream: Callable[[Callable[..., Any]], Callable[..., Any]],
    parse: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """``handler`` with its behavior wrapped: ``unary`` for unary responses, ``stream`` for
    streamed ones (server- or bidirectional). ``parse`` replaces the request deserializer of
    single-request methods (streamed requests are internal calls: their messages are ours)."""
    serializer = handler.response_serializer
    single = parse or handler.request_deserializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary), request_deserializer=single, response_serializer=serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            stream(handler.unary_stream),
            request_deserializer=single,
            response_serializer=serializer,
        )
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(
            stream(handler.stream_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=serializer,
        )
    raise ValueError(f"no client-streaming-only method is served here: {handler}")


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Every handler's exceptions become status codes through ``status_for``; a request that
    does not parse, or is larger than ``max_request_bytes``, gets INVALID_ARGUMENT."""

    def __init__(self, max_request_bytes: int | None = None) -> None:
        self.max_request_bytes = max_request_bytes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        parse = _tolerant(handler.request_deserializer, self.max_request_bytes)
        return wrap_handler(handler, _wrap_unary, _wrap_stream, parse)


class LateHandlers(grpc.GenericRpcHandler):
    """Handlers of services added after the server started: grpc registers methods only
    before start, so these are served through one generic handler registered before it.
    A generated ``add_*Servicer_to_server(servicer, late)`` takes this in place of a server;
    until then its methods are UNIMPLEMENTED."""

    def __init__(self) -> None:
        self._handlers: list[grpc.GenericRpcHandler] = []

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        for handler in self._handlers:
            found = handler.service(details)
            if found is not None:
                return found
        return None

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._handlers.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        """Served through the generic handler (the server has started)."""


class Server:
    """A grpc.aio server with health (NOT_SERVING until ``set_serving``) and reflection.
    ``interceptors`` run inside the error mapping (their domain errors become status codes
    too); ``outer_interceptors`` run outside it (they see the final status: metrics);
    ``credentials`` make the port TLS.

    ``max_request_bytes`` (the public gateway sets it) bounds request messages: larger ones
    get INVALID_ARGUMENT naming the limit, and beyond twice the limit gRPC itself refuses
    them (RESOURCE_EXHAUSTED) before they are read whole."""

    def __init__(
        self,
        address: str,
        service_names: list[str],
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        credentials: grpc.ServerCredentials | None = None,
        outer_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        max_request_bytes: int | None = None,
        reuse_port: bool = False,
    ) -> None:
        receive_limit = 256 << 20 if max_request_bytes is None else 2 * max_request_bytes
        self.server = grpc.aio.server(
            interceptors=[
                *outer_interceptors,
                ErrorMappingInterceptor(max_request_bytes),
                *interceptors,
            ],
            options=[
                ("grpc.max_receive_message_length", receive_limit),
                ("grpc.max_send_message_length", 256 << 20),
                # gRPC shares ports by default; only gateway processes meant to share one
                # do (``--gateway-processes``), so a port already taken fails at start.
                ("grpc.so_reuseport", int(reuse_port)),
                # gRPC core cancels calls at random (CANCELLED, no reason given) once more
                # than 1,000 wait for the server to take them: a burst of 3,000 ModelInfo
                # calls lost 8-25%. Admission (max_in_flight, RESOURCE_EXHAUSTED with its
                # cause) is the limit that refuses; this queue only rides out bursts.
                ("grpc.server.max_pending_requests", PENDING_CALLS),
                ("grpc.server.max_pending_requests_hard_limit", 2 * PENDING_CALLS),
            ],
        )
        #: Where a service added once the server runs goes (its model loads meanwhile).
        self.late = LateHandlers()
        self.server.add_generic_rpc_handlers([self.late])
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = service_names
        reflection.enable_server_reflection(
            [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")

    async def _set(self, status: int) -> None:
        for name in ["", *self.service_names]:
            result = self.health.set(name, status)
            if asyncio.iscoroutine(result):
                await result

    async def start(self) -> None:
        await self.server.start()
        await self._set(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def set_serving(self) -> None:
        await self._set(health_pb2.HealthCheckResponse.SERVING)

    async def set_not_serving(self) -> None:
        await self._set(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float = 1.0) -> None:
        await self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
