"""A request inside the engine: its tokens, its blocks and how far its KV cache is computed."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from engine.sampling_params import SamplingParams
from kvstore.block_hash import BlockHash

#: Stands in for a sampled token that is still on the device (async scheduling); the model
#: runner substitutes the real id on the device before any forward pass reads it.
PENDING_TOKEN = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    #: Decode role: blocks reserved, prompt KV arriving from the store, first token not yet.
    PREFETCHING = "prefetching"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of the chosen token and the top alternatives, from the model's raw
    distribution (before temperature and truncation)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    arrival_time: float = field(default_factory=time.monotonic)
    #: Scheduling priority under the ``priority`` policy: lower runs first (vLLM's rule).
    priority: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    #: Physical KV block ids, in order.
    block_table: list[int] = field(default_factory=list)
    #: Tokens whose K/V are in the cache (prefix hits included).
    num_computed_tokens: int = 0
    #: Prompt tokens found in the prefix cache at first admission.
    num_cached_tokens: int = 0
    #: Hashes of this sequence's full blocks, computed once and extended as it grows.
    block_hashes: list[BlockHash] = field(default_factory=list)
    #: Leading full blocks already registered in the prefix cache.
    num_committed_blocks: int = 0
    num_preemptions: int = 0
    #: Preempted to host memory: the host blocks holding its first ``num_swapped_tokens``
    #: tokens' K/V, copied back into device blocks when it resumes.
    host_block_table: list[int] = field(default_factory=list)
    num_swapped_tokens: int = 0
    #: Decode role: store hashes of the prompt's blocks (the last may be partial), imported
    #: instead of computed when the request is admitted.
    kv_import: list[BlockHash] | None = None
    #: Prefill role: leading full blocks already published to the store.
    num_published_blocks: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def tokens_between(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without building the whole list (the decode hot path)."""
        num_prompt = len(self.prompt_token_ids)
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return self.token_ids[start:end]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def has_pending_token(self) -> bool:
        return bool(self.output_token_ids) and self.output_token_ids[-1] == PENDING_TOKEN

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprob: TokenLogprob | None) -> None:
        self.output_token_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)

    def check_stop(self) -> FinishReason | None:
        """Token-level stop conditions; stop strings are checked where text exists."""
        last = self.output_token_ids[-1]
        if last in self.params.stop_token_ids:
            return FinishReason.STOP
        if not self.params.ignore_eos and last in self.eos_token_ids:
            return FinishReason.STOP
        if len(self.output_token_ids) >= self.params.max_tokens:
            return FinishReason.LENGTH
        return None
