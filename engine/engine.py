"""The engine core: requests in as token ids, token ids out, one ``step()`` at a time.

step():  schedule  ->  run the model  ->  append tokens, retire finished requests
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig, ModelConfig
from engine.errors import InvalidRequestError, WorkerLostError
from engine.host_publisher import HostPublisher
from engine.kv_transfer import KVTransfer
from engine.lane_transfer import open_lane
from engine.model_runner import DeviceTokens, ModelRunner
from engine.model_source import ModelSource, load_model_config, resolve_model
from engine.parallel import SINGLE
from engine.prefetch import Prefetcher
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from engine.sequence import (
    PENDING_TOKEN,
    FinishReason,
    Sequence,
    SequenceStatus,
    TokenLogprob,
)
from engine.swap import Swapper
from kvstore.base import KVStore
from kvstore.block_hash import BlockHash
from kvstore.errors import KVStoreError

logger = logging.getLogger(__name__)

# Device copies of finished requests' blocks waiting for the host publisher, at most.
RETAIN_QUEUE_BYTES = 2 << 30


@dataclass(frozen=True)
class StepOutput:
    """What one step produced for one request: only the new tokens (a diff, not a snapshot)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob]
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    #: Prefill role, on the request's end: store names of the prompt's blocks.
    kv_hashes: list[BlockHash] | None = None


def merge_outputs(outputs: list[StepOutput]) -> list[StepOutput]:
    """One output per request: a request reported twice in a step gets its tokens joined."""
    merged: dict[str, StepOutput] = {}
    for out in outputs:
        first = merged.get(out.request_id)
        merged[out.request_id] = (
            out
            if first is None
            else replace(
                out,
                new_token_ids=first.new_token_ids + out.new_token_ids,
                new_logprobs=first.new_logprobs + out.new_logprobs,
            )
        )
    return list(merged.values())


def cache_namespace(source: ModelSource, config: ModelConfig, engine: EngineConfig) -> bytes:
    """Block hashes are scoped to the weights and the cache layout they were computed with."""
    return (
        f"{source.path.name}|{config.architecture}|{config.num_hidden_layers}|"
        f"{config.num_key_value_heads}|{config.head_dim}|{engine.dtype}|{engine.cache.block_size}"
    ).encode()


def check_tp_shape(config: ModelConfig, world: int) -> None:
    """Heads split evenly over ranks (KV heads may instead be replicated)."""
    kv = config.num_key_value_heads
    if config.num_attention_heads % world or (kv % world and world % kv):
        raise InvalidRequestError(
            f"{config.num_attention_heads} attention / {kv} KV heads cannot be split over "
            f"{world} tensor-parallel ranks"
        )
    if config.intermediate_size % world:
        raise InvalidRequestError(
            f"intermediate size {config.intermediate_size} is not divisible by {world} ranks"
        )


class Engine:
    """``kv_store`` connects the engine to the shared store: with ``publish_kv`` (the prefill
    role) computed prompt blocks are published to it; requests added with ``kv_import`` (the
    decode role) load their prompt's blocks from it."""

    def __init__(
        self, config: EngineConfig, kv_store: KVStore | None = None, publish_kv: bool = False
    ) -> None:
        self.config = config
        self.source = resolve_model(config.model)
        self.model_config = load_model_config(self.source)
        model_limit = self.model_config.max_position_embeddings
        self.max_model_len = min(config.max_model_len or model_limit, model_limit)
        self.leader = None
        if config.tensor_parallel_size > 1:
            from engine.tensor_parallel import TPLeader, rank_device

            check_tp_shape(self.model_config, config.tensor_parallel_size)
            self.leader = TPLeader(config)
        self.runner = ModelRunner(
            config,
            self.model_config,
            self.source,
            self.leader,
            device=rank_device(config, 0) if self.leader else None,
            tp=self.leader.group if self.leader else SINGLE,
        )
        self.block_manager = BlockManager(
            self.runner.num_blocks,
            config.cache.block_size,
            cache_namespace(self.source, self.model_config, config),
            config.cache.enable_prefix_caching,
        )
        self.swapper = None
        if config.cache.swap_space_gib > 0 and self.leader is None:
            self.swapper = Swapper(
                self.runner.kv_cache, config.cache.swap_space_gib, config.cache.block_size
            )
        swap_space = self.swapper.space if self.swapper else None
        self.scheduler = Scheduler(config.scheduler, self.block_manager, swap_space)
        self.kv = None
        if kv_store is not None:
            lane = open_lane(kv_store, self.runner, config.cache.handoff_lane_mib, publish_kv)
            self.kv = KVTransfer(kv_store, self.runner, self.block_manager.namespace, lane)
            if not publish_kv and config.cache.resolved_async_retain(self.runner.device.type):
                self.kv.publisher = HostPublisher(
                    kv_store, self.runner.device, RETAIN_QUEUE_BYTES, self._count_retained
                )
        self.publish_kv = publish_kv and self.kv is not None
        self.prefetcher = (
            Prefetcher(self.kv, self.block_manager, self.scheduler) if self.kv else None
        )
        self.requests: dict[str, Sequence] = {}
        #: Async scheduling: the previous step's tokens, still on the device.
        self._in_flight: DeviceTokens | None = None
        #: Called on the engine thread with each step's chunks after the model ran (metrics).
        self.step_observers: list[Callable[[list[ScheduledChunk]], None]] = []
        self.generator = torch.Generator(device=config.device).manual_seed(config.seed)

    def shutdown(self) -> None:
        """Stops tensor-parallel followers; the engine is unusable afterwards."""
        try:
            if self.kv is not None and self.kv.publisher is not None:
                self.kv.publisher.close()
            if self.kv is not None and self.kv.lane is not None:
                self.kv.lane.close()
        finally:
            if self.leader is not None:
                self.runner.release_graphs(wait=self.leader.followers_alive)
                self.leader.shutdown()
                self.leader = None

    # -- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        output_token_ids: list[int] | None = None,
        kv_import: list[BlockHash] | None = None,
        priority: int = 0,
    ) -> str:
        """Queues a request. A decode-role request continues after ``output_token_ids`` (its
        first token) and names its prompt's blocks in the store with ``kv_import``.
        ``priority`` orders requests under the ``priority`` policy (lower first)."""
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        self._validate(prompt_token_ids, params)
        self._validate_tokens("output_token_ids", output_token_ids or [])
        if kv_import is not None:
            self._validate_import(prompt_token_ids, kv_import)
        elif self.publish_kv:
            kv_import = self.kv.stored_prefix(prompt_token_ids)  # type: ignore[union-attr]
        seq = Sequence(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            eos_token_ids=frozenset(self.model_config.eos_token_ids),
            output_token_ids=list(output_token_ids or []),
            kv_import=kv_import,
            priority=priority,
        )
        seq.generator = self._generator_for(params)
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def prefetch(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        priority: int = 0,
    ) -> None:
        """Decode role, pipelined hand-off: reserves blocks for a prompt that a prefill worker
        is computing now and pulls its blocks as they reach the store; ``resume`` continues it
        with the first token."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if self.prefetcher is None:
            raise InvalidRequestError("this engine has no KV store to import blocks from")
        self._validate(prompt_token_ids, params)
        seq = Sequence(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            eos_token_ids=frozenset(self.model_config.eos_token_ids),
            priority=priority,
        )
        seq.generator = self._generator_for(params)
        self.requests[request_id] = seq
        self.prefetcher.start(seq)

    def resume(self, request_id: str, first_token_id: int, kv_hashes: list[BlockHash]) -> None:
        """Queues a prefetched request to decode after ``first_token_id``; ``kv_hashes`` are
        the prefill worker's names for the prompt's blocks (they must be the prompt's)."""
        seq = self.requests.get(request_id)
        if seq is None or self.prefetcher is None:
            raise InvalidRequestError(f"request {request_id!r} is not known here")
        if not 0 <= first_token_id < self.model_config.vocab_size:
            raise InvalidRequestError(f"first token id {first_token_id} is out of range")
        self.prefetcher.resume(seq, first_token_id, kv_hashes)

    def _validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty")
        self._validate_tokens("prompt token ids", prompt_token_ids)
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) = "
                f"{total} exceeds the maximum model length {self.max_model_len}"
            )
        needed = self.block_manager.blocks_needed(total)
        if needed > self.runner.num_blocks:
            raise InvalidRequestError(
                f"request needs {needed} KV blocks but the cache holds {self.runner.num_blocks}"
            )

    def _validate_tokens(self, what: str, token_ids: list[int]) -> None:
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"{what} out of range [0, {vocab}): {bad[:5]}")

    def _validate_import(self, prompt_token_ids: list[int], kv_import: list[BlockHash]) -> None:
        if self.kv is None:
            raise InvalidRequestError("this engine has no KV store to import blocks from")
        expected = self.block_manager.blocks_needed(len(prompt_token_ids))
        if len(kv_import) != expected:
            raise InvalidRequestError(
                f"KV hand-off names {len(kv_import)} blocks; a {len(prompt_token_ids)}-token "
                f"prompt has {expected}"
            )

    def _generator_for(self, params: SamplingParams) -> torch.Generator | None:
        """Unseeded sampling shares the engine's generator; seeded draws make their own."""
        return None if params.is_greedy or params.seed is not None else self.generator

    def abort(self, request_id: str, retain: bool = True) -> bool:
        """Ends a request and frees its blocks; False if it is not (or no longer) known.
        ``retain`` leaves its computed blocks in the store as prefix cache (a decode worker's
        request cut short by a stop string); a failed step's KV is not kept."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        if self.prefetcher is not None:
            self.prefetcher.discard(request_id)
        if seq.has_pending_token:  # its token is still on the device: never reported, dropped
            seq.output_token_ids.pop()
        if retain and self._retains_finished and seq.status is SequenceStatus.RUNNING:
            self.kv.retain_finished([seq])  # type: ignore[union-attr]
        self.scheduler.finish(seq, FinishReason.ABORT)
        self.release_pins(request_id)  # blocks this worker pinned for it are not needed now
        return True

    def release_pins(self, request_id: str) -> None:
        """Drops the request's pins in the shared store; a store that cannot be reached
        (its pins then die with it, or with ``clear``) must not stop the abort."""
        if self.kv is None:
            return
        try:
            self.kv.store.release(request_id)
        except KVStoreError as error:
            logger.warning("cannot release the store pins of %s: %s", request_id, error)

    def _count_retained(self, num_blocks: int) -> None:
        assert self.kv is not None
        self.kv.num_retained_blocks += num_blocks

    @property
    def _retains_finished(self) -> bool:
        """A decode worker leaves finished requests' blocks in the store for the next turn."""
        return self.kv is not None and not self.publish_kv

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """With async scheduling the tokens a step samples are reported by the next step,
        which is launched on the device before they are read back."""
        if self.leader is not None and not self.leader.followers_alive:
            raise WorkerLostError("a tensor-parallel rank died; this worker is out of service")
        if self.prefetcher is not None and self.prefetcher.pending:
            self.prefetcher.pull()
        scheduled = self.scheduler.schedule()
        if self.kv is not None and not self.publish_kv:
            for seq in scheduled.preempted:
                if not seq.host_block_table:
                    # Resume from the prompt blocks still in the store rather than recomputing.
                    seq.kv_import = self.kv.stored_prefix(seq.prompt_token_ids)
        if self.swapper is not None:
            self.swapper.copy(scheduled.swap_out, scheduled.swap_in)
        chunks = self._import_blocks(scheduled)
        if not chunks:
            return self._take_in_flight()
        started = time.perf_counter()
        logits = self.runner.launch(chunks, self._in_flight)
        for observe in self.step_observers:
            observe(chunks)
        outputs = self._take_in_flight()  # overlaps the device's work on this step
        flight_reported = bool(outputs)
        for chunk in chunks:
            self._advance(chunk)
        if logits is None:
            return outputs
        self._observe_prefill(chunks, started)
        rows = [c.seq for c in chunks if c.completes]
        if self._defers(rows):
            self._in_flight = self.runner.greedy_on_device(logits, rows)
            for seq in rows:
                # A token that must end the request (max_tokens) gets no successor step.
                if not seq.is_finished and len(seq.output_token_ids) + 1 < seq.params.max_tokens:
                    seq.append_token(PENDING_TOKEN, None)
            return outputs
        for seq, (token_id, logprob) in zip(rows, self.runner.sampler(logits, rows), strict=True):
            if not seq.is_finished:
                seq.append_token(token_id, logprob)
                outputs.append(self._emit(seq, token_id, logprob))
        # A request whose previous token was still on the device reports two tokens now.
        return merge_outputs(outputs) if flight_reported else outputs

    def _observe_prefill(self, chunks: list[ScheduledChunk], started: float) -> None:
        """A step that is mostly prompt tokens measures the prefill rate swapping is weighed
        against (on CUDA the logits are still in flight: the rate is an upper bound)."""
        if self.swapper is None:
            return
        num_tokens = sum(c.num_tokens for c in chunks)
        num_prompt = sum(c.num_tokens for c in chunks if c.num_tokens > 1)
        if num_prompt * 2 >= num_tokens:
            self.swapper.cost.observe_prefill(num_tokens, time.perf_counter() - started)

    def _import_blocks(self, scheduled: SchedulerOutput) -> list[ScheduledChunk]:
        """Fills imported blocks from the store; returns the chunks that can run."""
        chunks = scheduled.chunks
        for block_import in scheduled.imports:
            assert self.kv is not None
            try:
                self.kv.load(block_import, keep_pins=self.publish_kv)
            except KeyError:  # evicted since it was named: recompute the request instead
                self.scheduler.requeue(block_import.seq)
                chunks = [c for c in chunks if c.seq is not block_import.seq]
        return chunks

    def _defers(self, rows: list[Sequence]) -> bool:
        """Whether this step's tokens can stay on the device until the next step: greedy rows
        only (the sampler's other paths read tokens on the host)."""
        return (
            self.config.overlaps_steps
            and not self.publish_kv
            and all(s.params.is_argmax for s in rows)
        )

    def _advance(self, chunk: ScheduledChunk) -> None:
        seq = chunk.seq
        if seq.is_finished:  # ended while the step ran (a stop in the previous step's token)
            return
        seq.num_computed_tokens = chunk.end
        self.block_manager.commit_computed(seq)
        if self.publish_kv:
            self.kv.publish_full(seq)  # type: ignore[union-attr]

    def _take_in_flight(self) -> list[StepOutput]:
        """Reads back the previous step's device tokens and reports them."""
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return []
        outputs = []
        for seq, token_id in zip(flight.seqs, flight.tolist(), strict=True):
            if seq.is_finished:  # aborted meanwhile
                continue
            if seq.has_pending_token:
                seq.output_token_ids[-1] = token_id
            else:
                seq.append_token(token_id, None)
            outputs.append(self._emit(seq, token_id, None))
        return outputs

    def _emit(self, seq: Sequence, token_id: int, logprob: TokenLogprob | None) -> StepOutput:
        """Checks stops on a newly appended token and describes it."""
        reason = seq.check_stop()
        kv_hashes = None
        if reason is not None:
            if self.publish_kv:
                kv_hashes = self.kv.publish_prompt(seq)  # type: ignore[union-attr]
            if self._retains_finished:  # its blocks are stored before they are freed
                self.kv.retain_finished([seq])  # type: ignore[union-attr]
            self._finish(seq, reason)
        return StepOutput(
            request_id=seq.request_id,
            new_token_ids=[token_id],
            new_logprobs=[logprob] if logprob is not None else [],
            finish_reason=reason,
            num_prompt_tokens=len(seq.prompt_token_ids),
            num_cached_tokens=seq.num_cached_tokens,
            kv_hashes=kv_hashes,
        )

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is not SequenceStatus.FINISHED:
            self.scheduler.finish(seq, reason)
        self.requests.pop(seq.request_id, None)
