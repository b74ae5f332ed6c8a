"""The engine core process: one worker's scheduler and model loop, nothing else.

The service that owns it (gRPC servicer) sends commands over a ZeroMQ PULL socket; after
every step the core sends one ``StepBatch`` with every request's new tokens and its load.
Nothing here knows gRPC, sessions or the gateway.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import torch
import zmq

from engine.config import CPU_THREADS_ENV, EngineConfig
from engine.core.messages import (
    Abort,
    Add,
    Codec,
    Command,
    Drain,
    EngineInfo,
    LoadStats,
    Ready,
    RequestOutput,
    Resume,
    StepBatch,
    Stop,
)
from engine.engine import Engine, StepOutput
from engine.errors import InvalidRequestError, OverloadedError, PdmeshError, WorkerLostError
from engine.scheduler import ScheduledChunk
from engine.sequence import FinishReason
from kvstore.errors import KVStoreError

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 50
#: How often an otherwise idle engine looks for blocks of prefetching requests.
PREFETCH_POLL_MS = 2
#: A load report goes out at least this often while nothing else does (routing, health).
LOAD_EVERY_S = 0.1
#: Store traffic metrics ride along with a report at most this often.
METRICS_EVERY_S = 0.1


class EngineStepError(PdmeshError):
    """The model step failed; every request in it was ended."""


@dataclass(frozen=True)
class CoreSpec:
    """How to build and reach one engine core (JSON on the child's command line)."""

    engine: EngineConfig
    role: str
    #: Store spec (``kvstore.factory.open_store``); None: no store (colocated, offline).
    store: str | None
    store_capacity_blocks: int
    command_address: str
    event_address: str
    #: Queued (not yet running) requests beyond this are refused with OverloadedError.
    max_waiting: int | None = None
    #: Count the store traffic (Prometheus) and report it with the load.
    metrics: bool = False


def error_of(error: BaseException) -> tuple[str, str]:
    return type(error).__name__, str(error)


def output_of(step: StepOutput) -> RequestOutput:
    return RequestOutput(
        step.request_id,
        step.new_token_ids,
        step.new_logprobs,
        step.finish_reason,
        step.num_prompt_tokens,
        step.num_cached_tokens,
        step.kv_hashes,
    )


def failed(request_id: str, error: BaseException) -> RequestOutput:
    return RequestOutput(request_id, [], [], FinishReason.ERROR, 0, 0, None, error_of(error))


class EngineCore:
    """Drives one ``Engine`` from commands; reports one batch per step."""

    def __init__(
        self, engine: Engine, events: Any, max_waiting: int | None, metrics: Any = None
    ) -> None:
        self.engine = engine
        #: The store traffic registry (prometheus_client), when metrics are on.
        self.metrics = metrics
        self.events = events
        self.codec = Codec()
        self.max_waiting = max_waiting
        self.lost: str | None = None
        self.draining = False
        self.stopping = False
        self.pending: list[RequestOutput] = []
        self._num_seqs = 0
        self._chunk_tokens: list[int] = []
        self._last_report = 0.0
        self._last_metrics = 0.0
        engine.step_observers.append(self._observe)

    # -- commands ---------------------------------------------------------------------------
    def handle(self, command: Command) -> None:
        try:
            if isinstance(command, Add):
                self._add(command)
            elif isinstance(command, Resume):
                self._resume(command)
            elif isinstance(command, Abort):
                self._abort(command)
            elif isinstance(command, Drain):
                self.draining = command.draining
            elif isinstance(command, Stop):
                self.stopping = True
        except Exception:  # one bad command must not end the loop
            logger.exception("engine command failed")

    def _add(self, add: Add) -> None:
        refusal = self._refusal()
        if refusal is not None:
            self.pending.append(failed(add.request_id, refusal))
            return
        try:
            if add.prefetch:
                self.engine.prefetch(add.prompt_token_ids, add.params, add.request_id, add.priority)
            else:
                self.engine.add_request(
                    add.prompt_token_ids,
                    add.params,
                    add.request_id,
                    add.output_token_ids,
                    add.kv_import,
                    add.priority,
                )
        except Exception as error:
            self.pending.append(failed(add.request_id, error))

    def _refusal(self) -> Exception | None:
        if self.lost is not None or self.draining:
            return WorkerLostError("this worker is out of service")
        num_waiting = len(self.engine.scheduler.waiting)
        if self.max_waiting is not None and num_waiting >= self.max_waiting:
            return OverloadedError(f"{num_waiting} requests wait on this worker (max_waiting)")
        return None

    def _resume(self, resume: Resume) -> None:
        try:
            self.engine.resume(resume.request_id, resume.first_token_id, resume.kv_hashes)
        except InvalidRequestError as error:
            self.engine.abort(resume.request_id, retain=False)
            self.pending.append(failed(resume.request_id, error))

    def _abort(self, abort: Abort) -> None:
        seq = self.engine.requests.get(abort.request_id)
        if not self.engine.abort(abort.request_id) or seq is None:
            # Finished here already (a prefill handed off just before its abort came): the
            # pins it left for the decode worker are not needed now the gateway is done.
            self.engine.release_pins(abort.request_id)
            return
        num_prompt = len(seq.prompt_token_ids)
        self.pending.append(
            RequestOutput(abort.request_id, [], [], FinishReason.ABORT, num_prompt, 0)
        )

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> None:
        """One engine step (or an idle pull of prefetching requests' blocks)."""
        engine = self.engine
        try:
            if engine.has_unfinished:
                self.pending.extend(output_of(o) for o in engine.step())
            elif engine.prefetcher is not None and engine.prefetcher.pending:
                engine.prefetcher.pull()
        except Exception as error:
            self._step_failed(error)

    @property
    def is_busy(self) -> bool:
        return self.engine.has_unfinished or bool(self.pending)

    @property
    def poll_ms(self) -> int:
        if self.is_busy:
            return 0
        prefetcher = self.engine.prefetcher
        return PREFETCH_POLL_MS if prefetcher is not None and prefetcher.pending else IDLE_POLL_MS

    def report(self) -> None:
        """Sends the step's outputs (or, now and then, just the load) as one message."""
        now = time.monotonic()
        if not self.pending and not self._num_seqs and now - self._last_report < LOAD_EVERY_S:
            return
        batch = StepBatch(
            self.pending, self.load(), self._num_seqs, self._chunk_tokens, self.lost,
            self._metrics_text(now),
        )  # fmt: skip
        self.events.send(self.codec.encoder.encode(batch), copy=False)
        self.pending, self._num_seqs, self._chunk_tokens = [], 0, []
        self._last_report = now

    def _metrics_text(self, now: float) -> str | None:
        """The store traffic counters, now and then, and always once the engine runs dry
        (so a scrape after the last request ends sees all of its traffic)."""
        if self.metrics is None:
            return None
        if now - self._last_metrics < METRICS_EVERY_S and self.engine.has_unfinished:
            return None
        from prometheus_client import generate_latest

        self._last_metrics = now
        return generate_latest(self.metrics).decode()

    def load(self) -> LoadStats:
        scheduler = self.engine.scheduler
        allocator = self.engine.block_manager.allocator
        outstanding = 0
        for queue in (scheduler.waiting, scheduler.running):
            for seq in queue:
                outstanding += max(0, len(seq.prompt_token_ids) - seq.num_computed_tokens)
        kv = self.engine.kv
        return LoadStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            outstanding_prefill_tokens=outstanding,
            num_free_blocks=allocator.num_free,
            num_total_blocks=allocator.num_blocks,
            num_used_blocks=allocator.num_used,
            num_retained_blocks=0 if kv is None else kv.num_retained_blocks,
            num_prefetched_blocks=0 if kv is None else kv.num_prefetched_blocks,
            num_loaded_blocks=0 if kv is None else kv.num_loaded_blocks,
        )

    def _observe(self, chunks: list[ScheduledChunk]) -> None:
        self._num_seqs += len(chunks)
        for chunk in chunks:
            if chunk.start < len(chunk.seq.prompt_token_ids):  # a prompt chunk, not a decode
                self._chunk_tokens.append(chunk.num_tokens)

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
        self.lost = str(error)

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id, retain=False)
            self.pending.append(failed(request_id, error))


def _build(spec: CoreSpec) -> tuple[Engine, EngineInfo, Any]:
    store, registry = None, None
    if spec.store is not None:
        from kvstore.factory import open_store

        store = open_store(spec.store, spec.store_capacity_blocks)
        if spec.metrics:
            from prometheus_client import CollectorRegistry

            from kvstore.metered import MeteredStore, StoreMetrics, store_path

            registry = CollectorRegistry()
            store = MeteredStore(store, StoreMetrics(registry, store_path(store)))
    engine = Engine(spec.engine, store, spec.role == "prefill")
    from engine.kv_transfer import transfer_path

    info = EngineInfo(
        namespace=engine.block_manager.namespace.decode(),
        block_size=engine.block_manager.block_size,
        num_blocks=engine.block_manager.allocator.num_blocks,
        vocab_size=engine.model_config.vocab_size,
        max_model_len=engine.max_model_len,
        transfer_path=transfer_path(store) if store is not None else "none",
        device=str(engine.runner.device),
        rank_pids=[] if engine.leader is None else [p.pid or 0 for p in engine.leader.followers],
        model_path=str(engine.source.path.absolute()),
        dtype=engine.config.dtype,
        scheduling_policy=engine.config.scheduler.policy,
    )
    return engine, info, registry


def _exit_with_parent() -> None:
    """The parent holds our stdin open: when it dies, so do we (no orphaned engines)."""
    sys.stdin.buffer.read()
    os._exit(0)


def main() -> None:
    """``python -m engine.core.process SPEC_JSON``: the child process's entry point."""
    spec = msgspec.json.decode(sys.argv[1], type=CoreSpec)
    if os.environ.get(CPU_THREADS_ENV):
        torch.set_num_threads(int(os.environ[CPU_THREADS_ENV]))
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    run_core(spec)
    logging.shutdown()
    os._exit(0)  # not through interpreter shutdown: the stdin thread is still reading


def run_core(spec: CoreSpec) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    context = zmq.Context()
    commands = context.socket(zmq.PULL)
    commands.connect(spec.command_address)
    events = context.socket(zmq.PUSH)
    events.setsockopt(zmq.SNDHWM, 0)  # never drop or block on a slow reader: it drains
    events.connect(spec.event_address)
    codec = Codec()
    try:
        engine, info, registry = _build(spec)
    except Exception as error:
        logger.exception("engine start-up failed")
        events.send(codec.encoder.encode(Ready(error=error_of(error))))
        events.close(linger=2000)
        return
    events.send(codec.encoder.encode(Ready(info)))
    core = EngineCore(engine, events, spec.max_waiting, registry)
    try:
        _loop(core, commands, codec)
    finally:
        engine.shutdown()
        events.close(linger=1000)
        commands.close(linger=0)


def _loop(core: EngineCore, commands: Any, codec: Codec) -> None:
    while not core.stopping:
        if commands.poll(core.poll_ms):
            while True:
                try:
                    frame = commands.recv(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                core.handle(codec.commands.decode(frame.buffer))
        core.step()
        core.report()


if __name__ == "__main__":
    main()
