"""Request ids across services, structured logs, and per-RPC metrics.

A request id travels gateway -> prefill -> decode in the ``x-request-id`` gRPC metadata (and
in the messages' ``request_id`` fields). The gateway honours one a client sends, in the header
or in ``GenerateRequest.request_id``, and otherwise makes one. Every server sets it as the
current request id while it handles the call, so each log line it writes names the request;
with ``--log-format json`` every line is one JSON object and ``request_id`` can be grepped or
queried across all services' logs. Calls the gateway makes carry the id on.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from pdmesh.v1 import generation_pb2 as gen_pb
from serving.request_ids import loggable, server_made_id
from serving.rpc import details_interceptors, with_metadata, wrap_handler

if TYPE_CHECKING:  # prometheus_client is imported only where metrics are served
    from serving.metrics import ServiceMetrics

HEADER = "x-request-id"
LOG_FORMATS = ("text", "json")
#: RPCs that carry no request: polling and plumbing, counted but not logged.
QUIET_METHODS = ("Load", "Info", "Check", "Watch", "ServerReflectionInfo", "ModelInfo", "Tokenize")

current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "pdmesh_request_id", default=None
)
logger = logging.getLogger("pdmesh.requests")


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (the current one, or "-") to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id and extras."""

    EXTRAS = ("service", "method", "code", "duration_ms")

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(
                record.created, datetime.timezone.utc
            ).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or current_request_id.get(),
        }
        for key in self.EXTRAS:
            if hasattr(record, key):
                line[key] = getattr(record, key)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(log_format: str = "text", level: int | str = logging.INFO) -> None:
    """The root logger of a service process: text (with the request id) or JSON lines."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _header(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == HEADER:
            return str(value)
    return None


def _request_id_of(request: Any, metadata: Any, assign: bool) -> str | None:
    """The call's request id: the header, else the message's field. With ``assign`` (the
    gateway's public API) a message without one gets the header's id or a new one, so the
    gateway, its workers and its logs all use the same id."""
    header = _header(metadata)
    field_id = getattr(request, "request_id", None)
    if assign and field_id == "":  # only the public Generate calls assign
        server_made_id.set(header is None)
        request.request_id = header or uuid.uuid4().hex
        return str(request.request_id)
    return field_id or header


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Outermost interceptor of a server: sets the current request id, logs the end of every
    request-carrying RPC with its status, and counts RPCs into the service's metrics."""

    def __init__(
        self, service: str, metrics: ServiceMetrics | None, assign_ids: bool = False
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.assign_ids = assign_ids

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        # A bidirectional call's id comes from the header (its messages are a stream).
        return wrap_handler(
            handler,
            functools.partial(self._unary, method),
            functools.partial(self._stream, method),
        )

    def _begin(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> float:
        metadata = context.invocation_metadata()
        assign = self.assign_ids and method.startswith("Generate")
        # A client's id reaches the logs only once it is known to be harmless there.
        current_request_id.set(loggable(_request_id_of(request, metadata, assign)))
        return self.metrics.rpc_started(method) if self.metrics else time.perf_counter()

    def _end(
        self, method: str, context: grpc.aio.ServicerContext, started: float, error: Any
    ) -> None:
        code = context.code()
        if isinstance(error, BaseException) and not isinstance(error, grpc.aio.AbortError):
            code = grpc.StatusCode.CANCELLED if _is_cancel(error) else grpc.StatusCode.UNKNOWN
            if code == grpc.StatusCode.CANCELLED and _deadline_passed(context):
                code = grpc.StatusCode.DEADLINE_EXCEEDED  # the client's deadline, not a cancel
        name = code.name if isinstance(code, grpc.StatusCode) else "OK"
        if self.metrics:
            self.metrics.rpc_finished(method, name, started)
        if method not in QUIET_METHODS:
            log_call(self.service, method, name, started)

    def _unary(
        self, method: str, behavior: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = self._begin(method, request, context)
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as raised:
                error = raised
                raise
            finally:
                self._end(method, context, started, error)

        return wrapped

    def _stream(
        self, method: str, behavior: Callable[..., AsyncIterator[Any]]
    ) -> Callable[..., AsyncIterator[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = self._begin(method, request, context)
            error: BaseException | None = None
            try:
                async for item in behavior(request, context):
                    yield item
            except BaseException as raised:
                error = raised
                raise
            finally:
                self._end(method, context, started, error)

        return wrapped


def log_call(service: str, method: str, code: str, started: float) -> None:
    duration_ms = (time.perf_counter() - started) * 1e3
    logger.info(
        "%s %s %s in %.1f ms",
        service,
        method,
        code,
        duration_ms,
        extra={"service": service, "method": method, "code": code,
               "duration_ms": round(duration_ms, 3)},
    )  # fmt: skip


class RequestCalls:
    """A worker's requests as the calls they are: many travel in one session stream, yet
    each is logged (with its id) and counted under ``method`` as if it were its own RPC."""

    def __init__(self, service: str, method: str, metrics: ServiceMetrics | None) -> None:
        self.service = service
        self.method = method
        self.metrics = metrics
        self._started: dict[str, float] = {}

    def started(self, request_id: str) -> None:
        metrics = self.metrics
        now = metrics.rpc_started(self.method) if metrics else time.perf_counter()
        self._started[request_id] = now

    def finished(self, request_id: str, code: str) -> None:
        started = self._started.pop(request_id, None)
        if started is None:
            return
        if self.metrics:
            self.metrics.rpc_finished(self.method, code, started)
        token = current_request_id.set(request_id)
        try:
            log_call(self.service, self.method, code, started)
        finally:
            current_request_id.reset(token)


def _is_cancel(error: BaseException) -> bool:
    return isinstance(error, (asyncio.CancelledError, GeneratorExit))


def _with_request_id(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    request_id = current_request_id.get()
    return details if request_id is None else with_metadata(details, [(HEADER, request_id)])


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Outgoing calls of every kind carry the current request id in ``x-request-id``."""
    return details_interceptors(_with_request_id)


#: The client's side of a deadline fires first: the server learns it a moment later.
DEADLINE_SLACK_S = 0.05


def _deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= DEADLINE_SLACK_S


def finish_status(reason: int, default: str) -> str:
    """The ``pdmesh_requests`` status of a FinishReason value; ``default`` while unfinished."""
    if reason == gen_pb.FINISH_REASON_UNSPECIFIED:
        return default
    return gen_pb.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()  # type: ignore[arg-type]
