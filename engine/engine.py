"""The engine core: requests in as token ids, token ids out, one ``step()`` at a time.

step():  schedule  ->  run the model  ->  append tokens, retire finished requests
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig, ModelConfig
from engine.errors import InvalidRequestError, WorkerLostError
from engine.kv_transfer import KVTransfer
from engine.model_runner import ModelRunner
from engine.model_source import ModelSource, load_model_config, resolve_model
from engine.parallel import SINGLE
from engine.prefetch import Prefetcher
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import FinishReason, Sequence, SequenceStatus, TokenLogprob
from kvstore.base import KVStore
from kvstore.block_hash import BlockHash


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
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.kv = (
            KVTransfer(kv_store, self.runner, self.block_manager.namespace) if kv_store else None
        )
        self.publish_kv = publish_kv and self.kv is not None
        self.prefetcher = (
            Prefetcher(self.kv, self.block_manager, self.scheduler) if self.kv else None
        )
        self.requests: dict[str, Sequence] = {}
        self.generator = torch.Generator(device=config.device).manual_seed(config.seed)

    def shutdown(self) -> None:
        """Stops tensor-parallel followers; the engine is unusable afterwards."""
        if self.leader is not None:
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
    ) -> str:
        """Queues a request. A decode-role request continues after ``output_token_ids`` (its
        first token) and names its prompt's blocks in the store with ``kv_import``."""
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        self._validate(prompt_token_ids, params)
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
        )
        seq.generator = self._generator_for(params)
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def prefetch(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
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
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token ids out of range [0, {vocab}): {bad[:5]}")
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
        if retain and self._retains_finished and seq.status is SequenceStatus.RUNNING:
            self.kv.retain_finished([seq])  # type: ignore[union-attr]
        self.scheduler.finish(seq, FinishReason.ABORT)
        if self.kv is not None:  # blocks this worker pinned for the request are not needed now
            self.kv.store.release(request_id)
        return True

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
        if self.leader is not None and not self.leader.followers_alive:
            raise WorkerLostError("a tensor-parallel rank died; this worker is out of service")
        if self.prefetcher is not None and self.prefetcher.pending:
            self.prefetcher.pull()
        scheduled = self.scheduler.schedule()
        if self.kv is not None and not self.publish_kv:
            for seq in scheduled.preempted:
                # Resume from the prompt blocks still in the store rather than recomputing.
                seq.kv_import = self.kv.stored_prefix(seq.prompt_token_ids)
        if not scheduled.chunks:
            return []
        chunks = scheduled.chunks
        for block_import in scheduled.imports:
            assert self.kv is not None
            try:
                self.kv.load(block_import, keep_pins=self.publish_kv)
            except KeyError:  # evicted since it was named: recompute the request instead
                self.scheduler.requeue(block_import.seq)
                chunks = [c for c in chunks if c.seq is not block_import.seq]
        if not chunks:
            return []
        sampled = iter(self.runner.execute(chunks))
        outputs = []
        retained: list[tuple[Sequence, FinishReason]] = []
        for chunk in chunks:
            seq = chunk.seq
            seq.num_computed_tokens = chunk.end
            self.block_manager.commit_computed(seq)
            if self.publish_kv:
                self.kv.publish_full(seq)  # type: ignore[union-attr]
            if not chunk.completes:
                continue
            token_id, logprob = next(sampled)
            seq.append_token(token_id, logprob)
            reason = seq.check_stop()
            kv_hashes = None
            if reason is not None and self.publish_kv:
                kv_hashes = self.kv.publish_prompt(seq)  # type: ignore[union-attr]
            if reason is not None and self._retains_finished:
                retained.append((seq, reason))  # its blocks are stored before they are freed
            elif reason is not None:
                self._finish(seq, reason)
            outputs.append(
                StepOutput(
                    request_id=seq.request_id,
                    new_token_ids=[token_id],
                    new_logprobs=[logprob] if logprob is not None else [],
                    finish_reason=reason,
                    num_prompt_tokens=len(seq.prompt_token_ids),
                    num_cached_tokens=seq.num_cached_tokens,
                    kv_hashes=kv_hashes,
                )
            )
        if retained:
            self.kv.retain_finished([seq for seq, _ in retained])  # type: ignore[union-attr]
            for seq, reason in retained:
                self._finish(seq, reason)
        return outputs

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is not SequenceStatus.FINISHED:
            self.scheduler.finish(seq, reason)
        self.requests.pop(seq.request_id, None)
