"""The OpenAI-compatible HTTP API of the gateway (Starlette), next to its gRPC one.

Every generation goes through ``GatewayCore.generate``, the entry the gRPC servicer uses:
the same admission, validation, chat template, routing, metrics and release of blocks.
This module only translates: OpenAI JSON in, OpenAI JSON or server-sent events out, and
domain errors to HTTP statuses through the gRPC codes ``serving.rpc.status_for`` gives them.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models[/{model}]
    GET /health (200 only while a request could be served)   GET /metrics (Prometheus)
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway.openai_choices import run_choices
from gateway.openai_output import Choice, Envelope, TokenText
from gateway.openai_schema import FieldError, OpenAIRequest, parse_chat, parse_completion
from gateway.service import GatewayCore
from pdmesh.v1 import generation_pb2 as gen_pb
from serving.auth import bearer_token
from serving.request_ids import caller_name, check_request_id, loggable
from serving.request_log import HEADER, current_request_id, log_call
from serving.rpc import status_for

logger = logging.getLogger(__name__)

#: Seconds a client may give a request (a header, as a gRPC deadline is metadata); past
#: it the request ends, its blocks are freed and the answer is 504.
TIMEOUT_HEADER = "x-request-timeout"
#: gRPC status of a domain error -> HTTP status, OpenAI error type, error code.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error", "not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "overloaded"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error", "deadline_exceeded"),
}


class HTTPError(Exception):
    """An answer decided here (a wrong model, a body too large, a missing key)."""

    def __init__(
        self, status: int, kind: str, code: str | None, message: str, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.message, self.param = (
            status, kind, code, message, param
        )  # fmt: skip


def error_of(error: BaseException) -> HTTPError:
    if isinstance(error, HTTPError):
        return error
    code, message = status_for(error)
    if code not in HTTP_STATUS:
        logger.exception("internal error", exc_info=error)
        return HTTPError(500, "internal_error", None, message)
    status, kind, error_code = HTTP_STATUS[code]
    return HTTPError(status, kind, error_code, message, getattr(error, "param", None))


def error_body(error: HTTPError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": error.kind,
            "param": error.param,
            "code": error.code,
        }
    }


def _caller(request: Request) -> str:
    """Who is calling (``caller_name``; HTTP has no mutual-TLS identity here)."""
    client = request.client
    peer = f"{client.host}:{client.port}" if client else "unknown"
    return caller_name(bearer_token(request.headers.get("authorization") or ""), None, peer)


def error_response(error: BaseException) -> JSONResponse:
    http = error_of(error)
    return JSONResponse(error_body(http), status_code=http.status)


async def routing_error(request: Request, error: Exception) -> Response:
    """Starlette's own answers (no such route: 404, a wrong method: 405) in OpenAI's shape,
    so a client's error handling sees one format."""
    assert isinstance(error, HTTPException)
    code = "not_found" if error.status_code == 404 else None
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {error.detail}"
    body = error_body(HTTPError(error.status_code, kind, code, message))
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


def sse(data: Any) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


@dataclass(frozen=True)
class HTTPConfig:
    """The gateway's HTTP front end."""

    #: Listen address; port 0 picks a free one.
    host: str = "127.0.0.1"
    port: int = 8080
    #: The model name clients send and ``/v1/models`` lists (default: the model's file or
    #: directory name, as ModelInfo reports it).
    served_model_name: str | None = None
    #: The gateway's API keys (``Authorization: Bearer KEY``); empty: open, as on gRPC.
    api_keys: frozenset[str] = frozenset()
    #: Largest request body; larger ones get 413 (the gRPC port's limit).
    max_request_bytes: int = 4 << 20
    #: Several gateway processes share the port (SO_REUSEPORT; the kernel spreads the
    #: connections). Off, a port already taken fails at start.
    reuse_port: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"bad HTTP port {self.port}")


class OpenAIFrontEnd:
    def __init__(self, core: GatewayCore, config: HTTPConfig) -> None:
        self.core = core
        self.config = config
        self.model = config.served_model_name or core.model_name
        self.created = int(time.time())
        self.tokens = TokenText(core.tokenizer)
        self._keys = [key.encode() for key in config.api_keys]

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.one_model, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.metrics, methods=["GET"]),
            ],
            exception_handlers={HTTPException: routing_error},
        )

    # -- checks every /v1 call passes -------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if not self._keys:
            return
        header = request.headers.get("authorization")
        if header is None:
            raise HTTPError(
                401, "authentication_error", "invalid_api_key",
                "missing API key (Authorization: Bearer ...)",
            )  # fmt: skip
        candidate = bearer_token(header).encode()
        # Every key compared in constant time, as the gRPC port does.
        if not any([hmac.compare_digest(candidate, key) for key in self._keys]):
            raise HTTPError(401, "authentication_error", "invalid_api_key", "invalid API key")

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model:
            raise HTTPError(
                404, "invalid_request_error", "model_not_found",
                f"the model {model!r} does not exist; this gateway serves {self.model!r}",
                "model",
            )  # fmt: skip

    async def _body(self, request: Request) -> Any:
        limit = self.config.max_request_bytes
        too_large = HTTPError(
            413, "invalid_request_error", "request_too_large",
            f"the request body is larger than this server's limit of {limit} bytes "
            "(max_request_bytes)",
        )  # fmt: skip
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except ValueError as error:
            raise FieldError("body", f"the request body is not valid JSON: {error}") from None

    @staticmethod
    def _timeout(request: Request) -> float | None:
        raw = request.headers.get(TIMEOUT_HEADER)
        if raw is None:
            return None
        try:
            seconds = float(raw)
        except ValueError:
            seconds = -1.0
        if not seconds > 0:
            raise FieldError(TIMEOUT_HEADER, f"{TIMEOUT_HEADER} must be seconds > 0, got {raw!r}")
        return seconds

    # -- endpoints ----------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        return await self._generation(request, parse_chat, "ChatCompletions")

    async def completions(self, request: Request) -> Response:
        return await self._generation(request, parse_completion, "Completions")

    async def _generation(
        self, request: Request, parse: Callable[[Any], OpenAIRequest], method: str
    ) -> Response:
        chosen = request.headers.get(HEADER)
        call = Call(self.core, method, loggable(chosen) or uuid.uuid4().hex)
        try:
            self._authorize(request)
            if chosen is not None:  # a client's own id lives in its caller's namespace
                check_request_id(chosen, HEADER)
                call.owner = _caller(request)
            parsed = parse(await self._body(request))
            self._check_model(parsed.model)
            timeout = self._timeout(request)
        except Exception as error:
            response = error_response(error)
            call.finished(response.status_code)
            return response
        prefix = "chatcmpl" if parsed.kind == "chat" else "cmpl"
        envelope = Envelope(
            f"{prefix}-{call.request_id}", int(time.time()), self.model, parsed, self.tokens
        )
        return GenerationResponse(self.core, call, envelope, timeout)

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except HTTPError as error:
            return error_response(error)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def one_model(self, request: Request) -> Response:
        try:
            self._authorize(request)
            self._check_model(request.path_params["model"])
        except HTTPError as error:
            return error_response(error)
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.model,
            "object": "model",
            "created": self.created,
            "owned_by": "pdmesh",
            "max_model_len": self.core.max_model_len,
        }

    async def health(self, request: Request) -> Response:
        if self.core.is_serving():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    async def metrics(self, request: Request) -> Response:
        if self.core.metrics is None:
            return JSONResponse(
                error_body(HTTPError(404, "not_found_error", None, "metrics are off")), 404
            )
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.core.metrics.registry), media_type=CONTENT_TYPE_LATEST)


class Call:
    """One HTTP generation call as the gateway's logs and RPC metrics see it."""

    def __init__(self, core: GatewayCore, method: str, request_id: str) -> None:
        self.method = method
        self.request_id = request_id
        #: Whose namespace the id lives in ("": the gateway made it).
        self.owner = ""
        self.metrics = core.metrics
        current_request_id.set(request_id)  # its logs and its calls to workers carry it
        self.started = (
            self.metrics.rpc_started(method) if self.metrics is not None else time.perf_counter()
        )

    def finished(self, status: int | str) -> None:
        if self.metrics is not None:
            self.metrics.rpc_finished(self.method, str(status), self.started)
        log_call("gateway-http", self.method, str(status), self.started)


class GenerationResponse(Response):
    """Runs the request while the client is there: a client that goes away cancels it (its
    blocks and pins are freed), as does the deadline of ``x-request-timeout``."""

    def __init__(
        self, core: GatewayCore, call: Call, envelope: Envelope, timeout: float | None
    ) -> None:
        self.core = core
        self.call = call
        self.envelope = envelope
        self.timeout = timeout
        self.started_body = False
        self.status = 200

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        work = asyncio.create_task(self._respond(send))
        gone = asyncio.create_task(_disconnected(receive))
        waits: set[asyncio.Task[Any]] = {work, gone}
        timer = None
        if self.timeout is not None:
            timer = asyncio.create_task(asyncio.sleep(self.timeout))
            waits.add(timer)
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                if gone in done:
                    self.status = 499  # nginx's "client closed request"; nothing is sent
                else:
                    await self._fail(send, TimeoutError(f"deadline of {self.timeout} s exceeded"))
            else:
                work.result()
        finally:
            for task in (gone, timer):
                if task is not None:
                    task.cancel()
            self.call.finished(self.status)

    async def _respond(self, send: Send) -> None:
        try:
            if self.envelope.request.stream:
                await self._stream(send)
            else:
                await self._whole(send)
        except Exception as error:
            await self._fail(send, error)

    async def _fail(self, send: Send, error: BaseException) -> None:
        http = error_of(error)
        self.status = http.status
        if self.started_body:  # a stream already under way: an error event ends it
            await send_body(send, sse(error_body(http)) + sse("[DONE]"), more=False)
            return
        await send_json(send, http.status, error_body(http))

    def _choices(self) -> list[Choice]:
        return [Choice(index) for index in range(self.envelope.request.n)]

    async def _whole(self, send: Send) -> None:
        choices = self._choices()
        async for index, piece in run_choices(
            self.core, self.envelope.request, self.call.request_id, self.call.owner
        ):
            choices[index].add(piece)
            _check_finished(piece)
        await send_json(send, 200, self.envelope.whole(choices))

    async def _stream(self, send: Send) -> None:
        envelope, choices = self.envelope, self._choices()
        pieces = run_choices(self.core, envelope.request, self.call.request_id, self.call.owner)
        opened = [False] * len(choices)
        async for index, piece in pieces:
            _check_finished(piece)
            if not self.started_body:  # the first token is out: errors are behind us
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", b"text/event-stream; charset=utf-8"),
                            (b"cache-control", b"no-cache"),
                        ],
                    }
                )
                self.started_body = True
            choice = choices[index]
            offset = len(choice.text)
            choice.add(piece)
            await send_body(send, sse(envelope.chunk(choice, piece, not opened[index], offset)))
            opened[index] = True
        tail = sse(envelope.usage_chunk(choices)) if envelope.request.include_usage else b""
        await send_body(send, tail + sse("[DONE]"), more=False)


def _check_finished(piece: gen_pb.GenerateResponse) -> None:
    """An ERROR finish is a failed request; ABORT here means someone aborted it."""
    if piece.finish_reason == gen_pb.FINISH_REASON_ERROR:
        raise RuntimeError("the request failed on a worker")
    if piece.finish_reason == gen_pb.FINISH_REASON_ABORT:
        raise HTTPError(499, "aborted", "aborted", "the request was aborted")


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the body is read: the next message is that)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send_body(send, data, more=False)


async def send_body(send: Send, data: bytes, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})
