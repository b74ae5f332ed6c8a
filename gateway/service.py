"""The Generation servicer and the gateway core that drives one request through the mesh:

validate -> prefill worker (first token, KV to the store) -> decode worker (stream)
         -> detokenize, stop strings -> client; the store's pins are released at the end
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from engine.config import ModelConfig
from engine.errors import InvalidRequestError
from engine.text_output import TextStream
from gateway.admission import Admission
from gateway.router import Router, Worker
from gateway.validation import ValidRequest, prompt_ids_of, validate
from kvstore.base import KVStore
from kvstore.block_hash import hash_full_blocks
from kvstore.errors import KVStoreError
from pdmesh.convert import sampling_to_pb
from pdmesh.request_log import finish_status
from pdmesh.v1 import generation_pb2 as gen_pb
from pdmesh.v1 import generation_pb2_grpc as gen_grpc
from pdmesh.v1 import worker_pb2 as worker_pb

if TYPE_CHECKING:
    from pdmesh.metrics import GatewayMetrics
logger = logging.getLogger(__name__)

UNSPECIFIED = gen_pb.FINISH_REASON_UNSPECIFIED
#: Codes of a worker call that mean the worker went away (CANCELLED: it stopped mid-call;
#: the gateway's own cancellations surface as asyncio.CancelledError instead).
WORKER_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


async def first_or_abort(work: asyncio.Future[Any], aborted: asyncio.Event) -> bool:
    """Waits for ``work`` or for an Abort; True when ``work`` finished first."""
    if aborted.is_set():
        return False
    waiter = asyncio.ensure_future(aborted.wait())
    try:
        done, _ = await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    return work in done


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
    clock: RequestClock = field(default_factory=RequestClock)
    cached_tokens: int = 0
    num_completion_tokens: int = 0
    aborted: asyncio.Event = field(default_factory=asyncio.Event)


class DecodeCall:
    """The call to a decode worker for one request. Pipelined, it opens at once with the
    prompt alone (the worker starts pulling blocks as the prefill publishes them) and the
    first token follows as a second message; otherwise the one message goes after the
    prefill. Closing it (cancelling the call) frees the request on the worker."""

    def __init__(
        self, worker: Worker, request: ValidRequest, pipelined_namespace: str | None
    ) -> None:
        self.worker = worker
        self.request = request
        self._second: asyncio.Future[worker_pb.DecodeRequest] = asyncio.Future()
        self._call: Any = None
        worker.in_flight += 1
        if pipelined_namespace is not None:  # the worker hashes the prompt itself
            opening = self._message()
            opening.kv.namespace = pipelined_namespace
            self._call = worker.stub.Decode(self._messages(opening))

    @property
    def call(self) -> Any:
        assert self._call is not None
        return self._call

    def _message(self) -> worker_pb.DecodeRequest:
        return worker_pb.DecodeRequest(
            request_id=self.request.request_id,
            prompt_token_ids=self.request.prompt_token_ids,
            sampling=sampling_to_pb(self.request.params),
        )

    async def _messages(self, opening: worker_pb.DecodeRequest | None) -> AsyncIterator[Any]:
        if opening is not None:
            yield opening
        yield await self._second

    def continue_after(self, prefill: worker_pb.PrefillResponse) -> None:
        """Hands the prefill's first token and blocks to the decode worker."""
        message = self._message()
        message.first_token_id = prefill.first_token_id
        message.kv.CopyFrom(prefill.kv)
        self._second.set_result(message)
        if self._call is None:
            self._call = self.worker.stub.Decode(self._messages(None))

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        self._second.cancel()
        self.worker.in_flight -= 1


class GatewayCore:
    def __init__(
        self,
        tokenizer: Any,
        model_config: ModelConfig,
        max_model_len: int,
        router: Router,
        store: KVStore,
        model_name: str,
        block_size: int,
        namespace: bytes,
        admission: Admission | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.max_model_len = max_model_len
        self.router = router
        self.store = store
        self.model_name = model_name
        self.block_size = block_size
        #: The workers' block-hash namespace, so the gateway names prompt blocks as they do.
        self.namespace = namespace
        self.running: dict[str, Running] = {}
        #: Prometheus metrics of this gateway, when they are served (pdmesh.metrics).
        self.metrics: GatewayMetrics | None = None
        self.admission = admission or Admission(max_in_flight=1024)
        #: Open the decode call when the prefill starts, so the decode worker pulls the
        #: prompt's blocks while they are computed (off: only after the first token).
        self.pipeline_handoff = True

    async def generate(
        self, message: gen_pb.GenerateRequest
    ) -> AsyncIterator[gen_pb.GenerateResponse]:
        with self.admission.admit():
            async for response in self._generate(message):
                yield response

    async def _generate(
        self, message: gen_pb.GenerateRequest
    ) -> AsyncIterator[gen_pb.GenerateResponse]:
        request = validate(
            message, self.tokenizer, self.model_config.vocab_size, self.max_model_len
        )
        if request.request_id in self.running:
            raise InvalidRequestError(f"request id {request.request_id!r} is already running")
        params = request.params
        text = TextStream.for_request(
            self.tokenizer, request.prompt_token_ids, params.stop, params.skip_special_tokens
        )
        state = Running(request, text)
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
        namespace = self.namespace.decode() if self.pipeline_handoff else None
        decode = DecodeCall(self.router.pick_decode(), state.request, namespace)
        try:
            prefill = await self._prefill(state)
            state.cached_tokens = prefill.cached_tokens
            reason = prefill.finish_reason
            logprobs = [prefill.logprob] if prefill.HasField("logprob") else []
            first = [] if reason == gen_pb.FINISH_REASON_ABORT else [prefill.first_token_id]
            yield self._piece(state, first, logprobs, reason)
            if reason != UNSPECIFIED or state.text.stopped:
                return
            if state.aborted.is_set():
                yield self._piece(state, [], [], gen_pb.FINISH_REASON_ABORT)
                return
            decode.continue_after(prefill)
            async for piece in self._follow(state, decode.call):
                yield piece
        except grpc.aio.AioRpcError as error:
            if error.code() in WORKER_GONE:
                self.router.mark_failed(decode.worker)  # until its Load answers again
            raise
        finally:
            decode.close()

    async def _route_prompt(self, state: Running, exclude: set[Worker]) -> tuple[Worker, int]:
        """A prefill (or colocated) worker and the prompt tokens it will have to compute."""
        prompt = state.request.prompt_token_ids
        hashes = hash_full_blocks(prompt, self.block_size, self.namespace)
        worker, matched = self.router.pick_prompt_worker(hashes, exclude)
        stored = await asyncio.to_thread(self.store.match_prefix, hashes)
        uncached = len(prompt) - max(matched, stored) * self.block_size
        worker.remember(hashes)
        worker.routed_tokens += uncached
        worker.recent_requests.append(state.request.request_id)
        return worker, max(uncached, 1)

    def _prompt_message(self, request: ValidRequest) -> worker_pb.PrefillRequest:
        return worker_pb.PrefillRequest(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            sampling=sampling_to_pb(request.params),
        )

    async def _prefill(self, state: Running) -> worker_pb.PrefillResponse:
        """One retry on another worker when a prefill worker is gone."""
        tried: set[Worker] = set()
        message = self._prompt_message(state.request)
        while True:
            worker, uncached = await self._route_prompt(state, tried)
            worker.outstanding_tokens += uncached
            worker.in_flight += 1
            call = worker.stub.Prefill(message)
            try:
                response = asyncio.ensure_future(call)
                if not await first_or_abort(response, state.aborted):
                    call.cancel()  # the prefill worker frees the request and its pins
                    return worker_pb.PrefillResponse(finish_reason=gen_pb.FINISH_REASON_ABORT)
                return response.result()  # type: ignore[no-any-return]
            except grpc.aio.AioRpcError as error:
                if error.code() not in WORKER_GONE or tried:
                    raise
                self.router.mark_failed(worker)
                tried.add(worker)
            finally:
                # Cancelled (client gone, deadline): the worker must drop the request too.
                call.cancel()
                worker.outstanding_tokens -= uncached
                worker.in_flight -= 1

    async def _colocated(self, state: Running) -> AsyncIterator[gen_pb.GenerateResponse]:
        worker, uncached = await self._route_prompt(state, set())
        worker.outstanding_tokens += uncached
        worker.in_flight += 1
        call = worker.stub.Generate(self._prompt_message(state.request))
        try:
            first = True
            async for piece in self._follow(state, call):
                if first:  # prompt work is done once the first token is out
                    worker.outstanding_tokens -= uncached
                    uncached, first = 0, False
                yield piece
        finally:
            call.cancel()
            worker.outstanding_tokens -= uncached
            worker.in_flight -= 1

    async def _follow(self, state: Running, call: Any) -> AsyncIterator[gen_pb.GenerateResponse]:
        """Relays a worker's token stream; a stop string or an Abort ends it early (an Abort
        at once, even while no token is coming), and cancelling the call frees the request
        on the worker."""
        try:
            while True:
                read = asyncio.ensure_future(call.read())
                if not await first_or_abort(read, state.aborted):
                    read.cancel()
                    yield self._piece(state, [], [], gen_pb.FINISH_REASON_ABORT)
                    return
                piece = read.result()
                if piece is grpc.aio.EOF:
                    return
                if piece.cached_tokens:
                    state.cached_tokens = piece.cached_tokens
                response = self._piece(
                    state, list(piece.token_ids), list(piece.logprobs), piece.finish_reason
                )
                yield response
                if response.finish_reason != UNSPECIFIED:
                    return
        finally:
            call.cancel()

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
            request_id=state.request.request_id,
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

    def abort(self, request_id: str) -> bool:
        state = self.running.get(request_id)
        if state is None:
            return False
        state.aborted.set()
        return True


class GenerationServicer(gen_grpc.GenerationServicer):
    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    async def Generate(
        self, request: gen_pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gen_pb.GenerateResponse]:
        async for response in self.core.generate(request):
            yield response

    async def GenerateUnary(
        self, request: gen_pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> gen_pb.GenerateResponse:
        whole = gen_pb.GenerateResponse()
        async for piece in self.core.generate(request):
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
        return gen_pb.TokenizeResponse(token_ids=prompt_ids_of(self.core.tokenizer, request))

    async def ModelInfo(
        self, request: gen_pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> gen_pb.ModelInfoResponse:
        core = self.core
        return gen_pb.ModelInfoResponse(
            model=core.model_name,
            max_model_len=core.max_model_len,
            vocab_size=core.model_config.vocab_size,
            block_size=core.block_size,
            num_prefill_workers=len(core.router.prefill or core.router.colocated),
            num_decode_workers=len(core.router.decode or core.router.colocated),
        )

    async def Abort(
        self, request: gen_pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> gen_pb.AbortResponse:
        return gen_pb.AbortResponse(aborted=self.core.abort(request.request_id))
