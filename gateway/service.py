"""The Generation servicer and the gateway core that drives one request through the mesh:

validate -> prefill worker (first token, KV to the store) -> decode worker (stream)
         -> detokenize, stop strings -> client; the store's pins are released at the end
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from engine.errors import InvalidRequestError
from engine.text_output import TextStream
from gateway.admission import Admission
from gateway.mesh_model import MeshModel
from gateway.router import Router, Worker
from gateway.sessions import Delta, RequestFeed, WorkerGoneError
from gateway.validation import ValidRequest, prompt_ids_of, validate
from kvstore.base import KVStore
from kvstore.block_hash import hash_full_blocks
from kvstore.errors import KVStoreError
from pdmesh.v1 import generation_pb2 as gen_pb
from pdmesh.v1 import generation_pb2_grpc as gen_grpc
from pdmesh.v1 import worker_pb2 as worker_pb
from serving.auth import presented_token
from serving.convert import sampling_to_pb
from serving.request_ids import caller_name, check_request_id, namespaced, server_made_id
from serving.request_log import finish_status

if TYPE_CHECKING:
    from serving.metrics import GatewayMetrics
logger = logging.getLogger(__name__)

UNSPECIFIED = gen_pb.FINISH_REASON_UNSPECIFIED
#: Threads that tokenize and render chat templates (the Rust tokenizer releases the GIL, so
#: a long prompt stalls no stream on the event loop).
TOKENIZER_THREADS = 4
T = TypeVar("T")


@dataclass
class RequestClock:
    start: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    num_tokens: int = 0

    def tokens(self, count: int) -> None:
        now = time.perf_counter()
        self.first_token = self.first_token or now
        self.last_token = now
        self.num_tokens += count

    def to_pb(self) -> gen_pb.Timings:
        end = self.last_token or time.perf_counter()
        first = self.first_token or end
        per_token = (end - first) / (self.num_tokens - 1) if self.num_tokens > 1 else 0.0
        return gen_pb.Timings(
            time_to_first_token_ms=(first - self.start) * 1e3,
            mean_time_per_output_token_ms=per_token * 1e3,
            total_ms=(end - self.start) * 1e3,
        )


@dataclass
class Running:
    """A request in flight, for Abort and for the final usage report."""

    request: ValidRequest
    text: TextStream
    #: The id its client knows (``request.request_id`` is the mesh's, namespaced by owner).
    public_id: str
    clock: RequestClock = field(default_factory=RequestClock)
    cached_tokens: int = 0
    num_completion_tokens: int = 0
    aborted: bool = False
    #: The feeds the request is reading now (an Abort interrupts them).
    feeds: list[RequestFeed] = field(default_factory=list)

    def read(self, feed: RequestFeed) -> RequestFeed:
        self.feeds.append(feed)
        if self.aborted:
            feed.interrupt()
        return feed


class GatewayCore:
    def __init__(
        self,
        tokenizer: Any,
        model: MeshModel,
        router: Router,
        store: KVStore,
        admission: Admission | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        #: What the workers serve (the gateway has no engine flags of its own).
        self.model = model
        self.max_model_len = model.max_model_len
        self.router = router
        self.store = store
        self.model_name = model.model_name
        self.block_size = model.block_size
        #: The workers' block-hash namespace, so the gateway names prompt blocks as they do.
        self.namespace = model.namespace.encode()
        self.running: dict[str, Running] = {}
        #: Prometheus metrics of this gateway, when they are served (serving.metrics).
        self.metrics: GatewayMetrics | None = None
        self.admission = admission or Admission(max_in_flight=1024)
        #: Open the decode call when the prefill starts, so the decode worker pulls the
        #: prompt's blocks while they are computed (off: only after the first token).
        self.pipeline_handoff = True
        #: The OpenAI HTTP front end serving this core, when there is one (its stop comes
        #: after the drain).
        self.http: Any = None
        #: Whether the KV store answers (gateway/store_watch.py keeps it current).
        self.store_available = True
        #: What ``close`` stops besides the router (the store watch, the sibling link).
        self.closers: list[Callable[[], Awaitable[None]]] = []
        self._tokenizing = ThreadPoolExecutor(TOKENIZER_THREADS, "pdmesh-tokenize")

    async def off_loop(self, work: Callable[..., T], *args: Any) -> T:
        """Tokenizer work (encoding, chat templates) on the tokenizer threads."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, work, *args)

    async def generate(
        self, message: gen_pb.GenerateRequest, owner: str = ""
    ) -> AsyncIterator[gen_pb.GenerateResponse]:
        """The one entry of every front end (the gRPC servicer, the OpenAI HTTP API).
        ``owner`` names the caller a client-chosen id belongs to ("" for a gateway-made id;
        see serving/request_ids.py)."""
        with self.admission.admit():
            async for response in self._generate(message, owner):
                yield response

    async def _generate(
        self, message: gen_pb.GenerateRequest, owner: str
    ) -> AsyncIterator[gen_pb.GenerateResponse]:
        request = await self.off_loop(
            validate, message, self.tokenizer, self.model.vocab_size, self.max_model_len
        )
        public_id = request.request_id
        if request.priority and not self.router.serves_by_priority():
            raise InvalidRequestError(
                f"priority {request.priority} needs workers started with --scheduling-policy "
                "priority; this mesh's serve in their own order (send priority 0 or omit it)"
            )
        request = dataclasses.replace(request, request_id=namespaced(owner, public_id))
        if request.request_id in self.running:  # only its owner can learn this
            raise InvalidRequestError(f"request id {public_id!r} is already running")
        params = request.params
        text = TextStream.for_request(
            self.tokenizer, request.prompt_token_ids, params.stop, params.skip_special_tokens
        )
        state = Running(request, text, public_id)
        self.running[request.request_id] = state
        status = "error"
        try:
            async for response in self._run(state):
                status = finish_status(response.finish_reason, status)
                yield response
        except (asyncio.CancelledError, GeneratorExit):
            status = "abort"  # the client went away
            raise
        finally:
            del self.running[request.request_id]
            if self.metrics is not None:
                self.metrics.request_finished(status, state)
            await self._release(request.request_id)

    async def _release(self, request_id: str) -> None:
        """Whatever happened, no pin of this request outlives it in the store. A store that
        cannot be reached must not turn a finished request into an error: its pins are
        gone with it or are dropped when it comes back and the namespace is cleared."""
        try:
            await asyncio.to_thread(self.store.release, request_id)
        except KVStoreError as error:
            logger.warning("cannot release the pins of %s: %s", request_id, error)

    async def _run(self, state: Running) -> AsyncIterator[gen_pb.GenerateResponse]:
        if self.router.is_colocated:
            async for piece in self._colocated(state):
                yield piece
            return
        request = state.request
        priority = request.priority
        decode = self.router.pick_decode(priority)
        decode.hold(priority, 1)
        feed = None
        if self.pipeline_handoff:  # the worker pulls blocks while the prefill computes them
            opening = self._start_message(request)
            opening.kv.namespace = self.namespace.decode()
            feed = state.read(decode.session.start(opening))
        try:
            prefill = await self._prefill(state)
            state.cached_tokens = prefill.cached_tokens
            reason = gen_pb.FINISH_REASON_ABORT if prefill.interrupted else prefill.finish_reason
            yield self._piece(state, prefill.token_ids, prefill.logprobs, reason)
            if reason != UNSPECIFIED or state.text.stopped:
                return
            assert prefill.kv is not None
            if feed is None:
                message = self._start_message(request)
                message.first_token_id = prefill.token_ids[0]
                message.kv.CopyFrom(prefill.kv)
                feed = state.read(decode.session.start(message))
            else:
                decode.session.resume(request.request_id, prefill.token_ids[0], prefill.kv)
            async for piece in self._follow(state, feed):
                yield piece
        finally:
            decode.session.end(request.request_id)
            decode.hold(priority, -1)

    async def _route_prompt(self, state: Running, exclude: set[Worker]) -> tuple[Worker, int]:
        """A prefill (or colocated) worker and the prompt tokens it will have to compute."""
        prompt = state.request.prompt_token_ids
        hashes = hash_full_blocks(prompt, self.block_size, self.namespace)
        worker, matched = self.router.pick_prompt_worker(hashes, exclude, state.request.priority)
        stored = await asyncio.to_thread(self.store.match_prefix, hashes)
        uncached = len(prompt) - max(matched, stored) * self.block_size
        worker.remember(hashes)
        worker.routed_tokens += uncached
        worker.recent_requests.append(state.public_id)
        return worker, max(uncached, 1)

    def _start_message(self, request: ValidRequest) -> worker_pb.StartRequest:
        return worker_pb.StartRequest(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            sampling=sampling_to_pb(request.params, worker_pb.WorkerSampling),
            priority=request.priority,
        )

    async def _prefill(self, state: Running) -> Delta:
        """The first token and the hand-off; one retry on another worker when a prefill
        worker is gone."""
        tried: set[Worker] = set()
        while True:
            worker, uncached = await self._route_prompt(state, tried)
            priority = state.request.priority
            worker.hold(priority, 1, uncached)
            feed = state.read(worker.session.start(self._start_message(state.request)))
            try:
                return await feed.next()  # a prefill reports once, at its end
            except WorkerGoneError:
                if tried:
                    raise
                tried.add(worker)
            finally:
                # Aborted, cancelled (client gone, deadline): the worker drops it too.
                worker.session.end(state.request.request_id)
                state.feeds.remove(feed)
                worker.hold(priority, -1, -uncached)

    async def _colocated(self, state: Running) -> AsyncIterator[gen_pb.GenerateResponse]:
        worker, uncached = await self._route_prompt(state, set())
        priority = state.request.priority
        worker.hold(priority, 1, uncached)
        feed = state.read(worker.session.start(self._start_message(state.request)))
        try:
            first = True
            async for piece in self._follow(state, feed):
                if first:  # prompt work is done once the first token is out
                    worker.hold(priority, 0, -uncached)
                    uncached, first = 0, False
                yield piece
        finally:
            worker.session.end(state.request.request_id)
            worker.hold(priority, -1, -uncached)

    async def _follow(
        self, state: Running, feed: RequestFeed
    ) -> AsyncIterator[gen_pb.GenerateResponse]:
        """Relays a worker's tokens, everything that arrived since the last read in one
        piece; a stop string or an Abort ends it early (an Abort at once, even while no
        token is coming)."""
        while True:
            delta = await feed.next()
            if delta.interrupted:
                yield self._piece(state, [], [], gen_pb.FINISH_REASON_ABORT)
                return
            if delta.cached_tokens:
                state.cached_tokens = delta.cached_tokens
            response = self._piece(state, delta.token_ids, delta.logprobs, delta.finish_reason)
            yield response
            if response.finish_reason != UNSPECIFIED:
                return

    def _piece(
        self, state: Running, token_ids: list[int], logprobs: list[Any], reason: int
    ) -> gen_pb.GenerateResponse:
        if token_ids:
            state.clock.tokens(len(token_ids))
            state.num_completion_tokens += len(token_ids)
        delta = state.text.add(token_ids, finished=reason != UNSPECIFIED)
        if state.text.stopped and reason == UNSPECIFIED:
            reason = gen_pb.FINISH_REASON_STOP
        response = gen_pb.GenerateResponse(
            request_id=state.public_id,
            text=delta,
            token_ids=token_ids,
            finish_reason=reason,  # type: ignore[arg-type]
            logprobs=logprobs,
        )
        if reason != UNSPECIFIED:
            response.usage.CopyFrom(
                gen_pb.Usage(
                    prompt_tokens=len(state.request.prompt_token_ids),
                    completion_tokens=state.num_completion_tokens,
                    cached_tokens=state.cached_tokens,
                )
            )
            response.timings.CopyFrom(state.clock.to_pb())
        return response

    def is_serving(self) -> bool:
        """A request could be served now: not draining, and a healthy worker at every step
        of its path (HTTP /health)."""
        router = self.router
        pools = [router.colocated] if router.is_colocated else [router.prefill, router.decode]
        has_path = all(any(worker.routable for worker in pool) for pool in pools)
        return has_path and self.store_available and not self.admission.is_draining

    async def close(self) -> None:
        """After the drain: the store watch, the links to sibling gateways and workers."""
        for close in self.closers:
            await close()
        await self.router.close()

    def abort(self, request_id: str, owner: str = "") -> bool:
        """Ends ``owner``'s request ``request_id`` (or the gateway-made id ``request_id``);
        another caller's request is unknown here."""
        state = self.running.get(namespaced(owner, request_id))
        if state is None:  # a gateway-made id, never the internal form of another's id
            state = self.running.get(request_id)
            if state is None or state.public_id != request_id:
                return False
        state.aborted = True
        for feed in state.feeds:
            feed.interrupt()
        return True


class GenerationServicer(gen_grpc.GenerationServicer):
    def __init__(
        self,
        core: GatewayCore,
        ask_siblings: Callable[[str, str], Awaitable[bool]] | None = None,
    ) -> None:
        self.core = core
        #: Gateway processes sharing this port: an Abort unknown here is asked of them.
        self.ask_siblings = ask_siblings

    async def Generate(
        self, request: gen_pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gen_pb.GenerateResponse]:
        async for response in self.core.generate(request, _owner_of_id(context)):
            yield response

    async def GenerateUnary(
        self, request: gen_pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> gen_pb.GenerateResponse:
        whole = gen_pb.GenerateResponse()
        async for piece in self.core.generate(request, _owner_of_id(context)):
            whole.request_id = piece.request_id
            whole.text += piece.text
            whole.token_ids.extend(piece.token_ids)
            whole.logprobs.extend(piece.logprobs)
            whole.finish_reason = piece.finish_reason
            if piece.HasField("usage"):
                whole.usage.CopyFrom(piece.usage)
                whole.timings.CopyFrom(piece.timings)
        return whole

    async def Tokenize(
        self, request: gen_pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> gen_pb.TokenizeResponse:
        ids = await self.core.off_loop(prompt_ids_of, self.core.tokenizer, request)
        return gen_pb.TokenizeResponse(token_ids=ids)

    async def ModelInfo(
        self, request: gen_pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> gen_pb.ModelInfoResponse:
        core = self.core
        return gen_pb.ModelInfoResponse(
            model=core.model_name,
            max_model_len=core.max_model_len,
            vocab_size=core.model.vocab_size,
            block_size=core.block_size,
            num_prefill_workers=len(core.router.prefill or core.router.colocated),
            num_decode_workers=len(core.router.decode or core.router.colocated),
            num_refused_workers=sum(w.refused is not None for w in core.router.workers),
        )

    async def Abort(
        self, request: gen_pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> gen_pb.AbortResponse:
        check_request_id(request.request_id)
        owner = caller(context)
        aborted = self.core.abort(request.request_id, owner)
        if not aborted and self.ask_siblings is not None:
            aborted = await self.ask_siblings(request.request_id, owner)
        return gen_pb.AbortResponse(aborted=aborted)


def caller(context: grpc.aio.ServicerContext) -> str:
    """Who is calling (``caller_name``)."""
    names = context.auth_context().get("x509_common_name")
    identity = names[0].decode(errors="replace") if names else None
    return caller_name(presented_token(context.invocation_metadata()), identity, context.peer())


def _owner_of_id(context: grpc.aio.ServicerContext) -> str:
    """Whose namespace the call's request id lives in: nobody's for a gateway-made id."""
    return "" if server_made_id.get() else caller(context)
