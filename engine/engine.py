"""The engine core: requests in as token ids, token ids out, one ``step()`` at a time.

step():  schedule  ->  run the model  ->  append tokens, retire finished requests
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig, ModelConfig
from engine.errors import InvalidRequestError
from engine.model_runner import ModelRunner
from engine.model_source import ModelSource, load_model_config, resolve_model
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import FinishReason, Sequence, SequenceStatus, TokenLogprob


@dataclass(frozen=True)
class StepOutput:
    """What one step produced for one request: only the new tokens (a diff, not a snapshot)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob]
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int


def cache_namespace(source: ModelSource, config: ModelConfig, engine: EngineConfig) -> bytes:
    """Block hashes are scoped to the weights and the cache layout they were computed with."""
    return (
        f"{source.path.name}|{config.architecture}|{config.num_hidden_layers}|"
        f"{config.num_key_value_heads}|{config.head_dim}|{engine.dtype}|{engine.cache.block_size}"
    ).encode()


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.source = resolve_model(config.model)
        self.model_config = load_model_config(self.source)
        model_limit = self.model_config.max_position_embeddings
        self.max_model_len = min(config.max_model_len or model_limit, model_limit)
        self.runner = ModelRunner(config, self.model_config, self.source)
        self.block_manager = BlockManager(
            self.runner.num_blocks,
            config.cache.block_size,
            cache_namespace(self.source, self.model_config, config),
            config.cache.enable_prefix_caching,
        )
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.requests: dict[str, Sequence] = {}
        self.generator = torch.Generator(device=config.device).manual_seed(config.seed)

    # -- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
    ) -> str:
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        self._validate(prompt_token_ids, params)
        seq = Sequence(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            eos_token_ids=frozenset(self.model_config.eos_token_ids),
        )
        seq.generator = self._generator_for(params)
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return request_id

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

    def _generator_for(self, params: SamplingParams) -> torch.Generator | None:
        if params.is_greedy:
            return None
        if params.seed is None:
            return self.generator
        return torch.Generator(device=self.config.device).manual_seed(params.seed)

    def abort(self, request_id: str) -> bool:
        """Ends a request and frees its blocks; False if it is not (or no longer) known."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, FinishReason.ABORT)
        return True

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        sampled = iter(self.runner.execute(chunks))
        outputs = []
        for chunk in chunks:
            seq = chunk.seq
            seq.num_computed_tokens = chunk.end
            self.block_manager.commit_computed(seq)
            if not chunk.completes:
                continue
            token_id, logprob = next(sampled)
            seq.append_token(token_id, logprob)
            reason = seq.check_stop()
            if reason is not None:
                self._finish(seq, reason)
            outputs.append(
                StepOutput(
                    request_id=seq.request_id,
                    new_token_ids=[token_id],
                    new_logprobs=[logprob] if logprob is not None else [],
                    finish_reason=reason,
                    num_prompt_tokens=len(seq.prompt_token_ids),
                    num_cached_tokens=seq.num_cached_tokens,
                )
            )
        return outputs

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is not SequenceStatus.FINISHED:
            self.scheduler.finish(seq, reason)
        self.requests.pop(seq.request_id, None)
