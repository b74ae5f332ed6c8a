"""An engine's step loop on its own thread, driven from asyncio.

gRPC servicers live on an event loop; the model runs synchronously. Requests and aborts
cross into the engine thread as commands; step outputs cross back through
``call_soon_threadsafe`` into one asyncio queue per request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from engine.engine import Engine, StepOutput
from engine.errors import InvalidRequestError, OverloadedError, PdmeshError, WorkerLostError
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason
from kvstore.block_hash import BlockHash
from kvstore.errors import KVStoreError

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05
#: How often an otherwise idle engine looks for blocks of prefetching requests.
PREFETCH_POLL_S = 0.002


def aborted_output(request_id: str, num_prompt_tokens: int) -> StepOutput:
    return StepOutput(request_id, [], [], FinishReason.ABORT, num_prompt_tokens, 0)


class EngineStepError(PdmeshError):
    """The model step failed; every request in it was ended."""


@dataclass(frozen=True)
class LoadStats:
    num_running: int
    num_waiting: int
    outstanding_prefill_tokens: int
    num_free_blocks: int
    num_total_blocks: int
    num_used_blocks: int


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[StepOutput | BaseException]

    def push(self, item: StepOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(
        self,
        engine: Engine,
        name: str = "engine",
        on_lost: Callable[[], object] | None = None,
        max_waiting: int | None = None,
    ) -> None:
        self.engine = engine
        #: Requests queued (not yet running) beyond this are refused with OverloadedError.
        self.max_waiting = max_waiting
        #: False once the engine can no longer serve; ``on_lost`` runs once at that moment.
        self.healthy = True
        self._on_lost = on_lost
        self._commands: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)
        if not self._thread.is_alive():  # never race the engine thread's collectives
            self.engine.shutdown()

    # -- asyncio side ------------------------------------------------------------------------
    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        output_token_ids: list[int] | None = None,
        kv_import: list[BlockHash] | None = None,
        prefetch: bool = False,
    ) -> AsyncIterator[StepOutput]:
        """Step outputs of one request until it finishes. Leaving early (cancellation, an
        exception in the consumer) aborts the request and frees its blocks. With ``prefetch``
        (decode role) the request waits for ``resume`` while its prompt's blocks arrive."""
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already running here")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        finished = False

        def add() -> None:
            if not self.healthy:
                stream.push(WorkerLostError("this worker is out of service"))
                return
            num_waiting = len(self.engine.scheduler.waiting)
            if self.max_waiting is not None and num_waiting >= self.max_waiting:
                stream.push(
                    OverloadedError(f"{num_waiting} requests wait on this worker (max_waiting)")
                )
                return
            try:
                if prefetch:
                    self.engine.prefetch(prompt_token_ids, params, request_id)
                else:
                    self.engine.add_request(
                        prompt_token_ids, params, request_id, output_token_ids, kv_import
                    )
            except Exception as error:
                stream.push(error)

        self._submit(add)
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]
            if not finished:
                self.abort(request_id, abandoned=True)

    def abort(self, request_id: str, abandoned: bool = False) -> None:
        """Ends the request; a caller still waiting on its stream gets a final ABORT output.
        ``abandoned``: its caller left before seeing the end, so store pins it took for a
        successor (a prefill's published prompt) are released even if it has finished."""

        def command() -> None:
            seq = self.engine.requests.get(request_id)
            if not self.engine.abort(request_id) or seq is None:
                if abandoned:
                    self.engine.release_pins(request_id)
                return
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.push(aborted_output(seq.request_id, len(seq.prompt_token_ids)))

        self._submit(command)

    def resume(self, request_id: str, first_token_id: int, kv_hashes: list[BlockHash]) -> None:
        """Continues a prefetched request after its first token (its stream gets the error if
        the hand-off is refused)."""

        def command() -> None:
            try:
                self.engine.resume(request_id, first_token_id, kv_hashes)
            except InvalidRequestError as error:
                self.engine.abort(request_id, retain=False)
                stream = self._streams.get(request_id)
                if stream is not None:
                    stream.push(error)

        self._submit(command)

    def load(self) -> LoadStats:
        """A snapshot read from another thread: counters only, no structure is mutated."""
        scheduler = self.engine.scheduler
        pending = list(scheduler.waiting) + list(scheduler.running)
        allocator = self.engine.block_manager.allocator
        return LoadStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            outstanding_prefill_tokens=sum(
                max(0, len(s.prompt_token_ids) - s.num_computed_tokens) for s in pending
            ),
            num_free_blocks=allocator.num_free,
            num_total_blocks=allocator.num_blocks,
            num_used_blocks=allocator.num_used,
        )

    # -- engine thread -----------------------------------------------------------------------
    def _submit(self, command: Callable[[], object]) -> None:
        self._commands.put(command)
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            self._drain_commands()
            if not self.engine.has_unfinished:
                prefetcher = self.engine.prefetcher
                if prefetcher is not None and prefetcher.pending:
                    try:
                        prefetcher.pull()
                    except Exception as error:  # the store failed: so do the requests
                        self._step_failed(error)
                    self._wake.wait(PREFETCH_POLL_S)
                else:
                    self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as error:
                self._step_failed(error)
                continue
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is not None:
                    stream.push(output)

    def _step_failed(self, error: Exception) -> None:
        if isinstance(error, WorkerLostError):
            logger.error("%s", error)
            self._lose(error)
        elif self.engine.leader is not None:
            # Ranks may now disagree on the next collective: stop serving rather than guess.
            logger.exception("tensor-parallel step failed")
            self._lose(WorkerLostError(f"tensor-parallel step failed: {error}"))
        elif isinstance(error, KVStoreError):  # store down or full: a status the caller reads
            logger.warning("engine step failed: %s", error)
            self._fail_all(error)
        else:  # fail the step's requests, keep serving
            logger.exception("engine step failed")
            self._fail_all(EngineStepError(f"engine step failed: {error}"))

    def _lose(self, error: WorkerLostError) -> None:
        self._fail_all(error)
        if self.healthy and self._on_lost is not None:
            self._on_lost()
        self.healthy = False

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                command()
            except Exception:  # one bad command must not end the engine thread
                logger.exception("engine command failed")

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id, retain=False)
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.push(error)
