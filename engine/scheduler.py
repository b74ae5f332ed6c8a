"""Iteration-level (Orca-style) continuous batching under a token budget and a KV block budget.

Each step runs every running sequence's next tokens (one for a decode, a chunk for a prompt
still being prefilled) and then admits waiting requests while blocks and budget allow. When
blocks run out, the newest running sequence is preempted: its blocks are freed, its tokens
kept, and it is recomputed (often from the prefix cache) when it is admitted again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.sequence import FinishReason, Sequence, SequenceStatus
from kvstore.block_hash import BlockHash


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens [start, end) of ``seq`` are computed this step."""

    seq: Sequence
    start: int
    end: int
    #: After this chunk all of the sequence's tokens are computed: sample the next one.
    completes: bool

    @classmethod
    def next_for(cls, seq: Sequence, num_tokens: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        end = start + num_tokens
        return cls(seq, start, end, completes=end == seq.num_tokens)

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class BlockImport:
    """Blocks of ``seq`` to fill from the shared store before the step runs."""

    seq: Sequence
    block_ids: list[int]
    hashes: list[BlockHash]


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    imports: list[BlockImport]


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        imports: list[BlockImport] = []
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue  # preempted earlier in this loop
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            if not self._reserve_running(seq, num_tokens):
                continue
            chunks.append(ScheduledChunk.next_for(seq, num_tokens))
            budget -= num_tokens
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            hits = self.blocks.match_prefix(seq)
            num_tokens = seq.num_uncomputed_tokens - len(hits) * self.blocks.block_size
            if seq.kv_import is None:
                num_tokens = min(num_tokens, budget)
            if not self.blocks.can_allocate(seq, num_tokens, hits):
                break  # first come, first served: later requests wait behind this one
            self.waiting.popleft()
            self.blocks.allocate(seq, num_tokens, hits)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = seq.num_computed_tokens
            if seq.kv_import is not None:
                imports.append(self._import_prompt(seq, len(hits)))
                num_tokens = seq.num_uncomputed_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk.next_for(seq, num_tokens))
            budget -= num_tokens
        return SchedulerOutput(chunks, imports)

    def _import_prompt(self, seq: Sequence, num_hit_blocks: int) -> BlockImport:
        """The prompt's KV comes from the store (all blocks past local prefix hits); only the
        tokens after the prompt are computed."""
        assert seq.kv_import is not None
        num_prompt_blocks = len(seq.kv_import)
        seq.num_computed_tokens = len(seq.prompt_token_ids)
        return BlockImport(
            seq,
            seq.block_table[num_hit_blocks:num_prompt_blocks],
            seq.kv_import[num_hit_blocks:num_prompt_blocks],
        )

    def _reserve_running(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for ``seq``'s next tokens, preempting the newest sequences if needed.
        Returns False when ``seq`` itself was preempted."""
        while not self.blocks.can_allocate(seq, num_tokens, []):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.allocate(seq, num_tokens, [])
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        seq.kv_import = None  # resume by recomputation: the store may have evicted the blocks
        self.waiting.appendleft(seq)  # resumes before anything that arrived after it

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Retires a sequence however it ends, freeing every block it holds."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
