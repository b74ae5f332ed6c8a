"""Iteration-level (Orca-style) continuous batching under a token budget and a KV block budget.

Each step runs every running sequence's next tokens (one for a decode, a chunk for a prompt
still being prefilled) and then admits waiting requests while blocks and budget allow. When
blocks run out, a running sequence is preempted: its blocks are freed, its tokens kept, and
it is recomputed (often from the prefix cache) when it is admitted again. Which requests run
first and which one is preempted is the scheduling policy's call (``engine.scheduling_policy``:
first come first served and the newest preempted by default).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.scheduling_policy import make_policy
from engine.sequence import FinishReason, Sequence, SequenceStatus
from engine.swap import SwapSpace
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
    #: Sequences preempted this step (their blocks are freed; they wait to resume).
    preempted: list[Sequence]
    #: (device block, host block) copies to make before the step runs, swap-outs first:
    #: a swapped-out block may be handed to a swapped-in one in the same step.
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class _StepPlan:
    """What one step schedules, as it is built."""

    budget: int
    chunks: list[ScheduledChunk] = field(default_factory=list)
    imports: list[BlockImport] = field(default_factory=list)
    scheduled: set[Sequence] = field(default_factory=set)

    def add(self, chunk: ScheduledChunk) -> None:
        self.chunks.append(chunk)
        self.scheduled.add(chunk.seq)
        self.budget -= chunk.num_tokens


def is_decoding(seq: Sequence) -> bool:
    """A decode computes its last sampled token; a prompt's final token is still prefill
    (it waits for blocks rather than preempting anyone)."""
    return bool(seq.output_token_ids) and seq.num_uncomputed_tokens == 1


class Scheduler:
    """``swap`` (optional) is a host block pool: a preempted request whose KV the pool can
    hold, and that ``swap.should_swap`` says is cheaper to copy than to recompute, is swapped
    out to it and swapped back in when it resumes."""

    def __init__(
        self, config: SchedulerConfig, block_manager: BlockManager, swap: SwapSpace | None = None
    ) -> None:
        self.config = config
        self.blocks = block_manager
        self.swap = swap
        self._swap_out: list[tuple[int, int]] = []
        self._swap_in: list[tuple[int, int]] = []
        self.policy = make_policy(config)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._preempted_this_step: list[Sequence] = []
        #: A decode had to preempt for a block this step: admitting now would thrash.
        self._short_of_blocks = False

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.policy.add(seq)
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        """Stall-free order (Sarathi-Serve): every running decode gets its token first, then
        prompts in progress continue their chunks, then waiting requests are admitted, all
        within one token budget. The policy orders both queues; under a ranked policy a
        waiting request first displaces running ones it outranks when there is no room, and
        running prompts it outranks continue only after it is admitted."""
        plan = _StepPlan(self.config.max_num_batched_tokens)
        self._preempted_this_step = []
        self._swap_out, self._swap_in = [], []
        self._short_of_blocks = False
        self.policy.begin_step([*self.running, *self.waiting])
        self._order_queues()
        if self.policy.preempts_for_waiting:
            self._make_room(plan.budget)
        for seq in [s for s in self.running if is_decoding(s)]:
            if plan.budget == 0:
                break
            if seq.status is SequenceStatus.RUNNING and self._reserve_decode(seq, plan.scheduled):
                plan.add(ScheduledChunk.next_for(seq, 1))
        self._order_queues()  # preempted requests rejoin the waiting queue in rank
        prompts = [s for s in self.running if s not in plan.scheduled]
        first = self.waiting[0] if self.waiting else None
        behind = [s for s in prompts if first is not None and self.policy.outranks(first, s)]
        self._continue_prompts(plan, [s for s in prompts if s not in behind])
        self._admit_waiting(plan)
        self._continue_prompts(plan, behind)
        self._break_block_deadlock(plan)
        self.policy.scheduled([c.seq for c in plan.chunks])
        return SchedulerOutput(
            plan.chunks, plan.imports, self._preempted_this_step, self._swap_out, self._swap_in
        )

    def _order_queues(self) -> None:
        self.running[:] = self.policy.order(self.running)
        ordered = self.policy.order(list(self.waiting))
        if ordered != list(self.waiting):
            self.waiting = deque(ordered)

    def _break_block_deadlock(self, plan: _StepPlan) -> None:
        """An empty step with requests running means each is a prompt in progress waiting
        for blocks the others hold (a ranked policy let a later prompt start before an
        earlier one finished): the policy's victims give theirs back until one can go on."""
        while not plan.chunks and self.running:
            self._preempt(self.policy.victim(self.running))
            self._continue_prompts(plan, list(self.running))

    def _continue_prompts(self, plan: _StepPlan, seqs: list[Sequence]) -> None:
        """Next chunks of prompts in progress, as far as budget and free blocks go."""
        for seq in seqs:
            if plan.budget == 0:
                break
            num_tokens = self._fit(seq, min(seq.num_uncomputed_tokens, plan.budget))
            if num_tokens == 0:
                continue  # no blocks now: the prompt waits, decodes go on
            self.blocks.allocate(seq, num_tokens, [])
            plan.add(ScheduledChunk.next_for(seq, num_tokens))

    def _admit_waiting(self, plan: _StepPlan) -> None:
        # After a decode preempted for blocks, admitting would only take them back (thrashing).
        while (
            self.waiting
            and plan.budget > 0
            and len(self.running) < self.config.max_num_seqs
            and not self._short_of_blocks
        ):
            admitted = self._admit(self.waiting[0], plan.budget)
            if admitted is None:
                break  # in order: later requests wait behind this one
            chunk, block_import = admitted
            if block_import is not None:
                plan.imports.append(block_import)
            plan.add(chunk)

    def _make_room(self, budget: int) -> None:
        """Ranked policies: waiting requests, best first, preempt the running requests they
        outrank (the policy's victim first) until their first chunk fits beside the ones
        before them; the first one that cannot be given room ends it (requests after it
        outrank fewer)."""
        budget -= sum(1 for s in self.running if is_decoding(s))
        num_blocks = 0  # taken by the requests before this one (num_seats of them)
        for num_seats, seq in enumerate(list(self.waiting)):
            if budget <= 0:
                return
            hits, import_tokens, num_tokens = self._admission_need(seq, budget)
            needed = self.blocks.num_new_blocks(seq, import_tokens + num_tokens, hits)
            while (
                len(self.running) + num_seats >= self.config.max_num_seqs
                or needed + num_blocks > self.blocks.num_free_blocks
            ):
                victims = [s for s in self.running if self.policy.outranks(seq, s)]
                if not victims:
                    return
                self._preempt(self.policy.victim(victims))
            budget -= num_tokens
            num_blocks += needed

    def _admission_need(self, seq: Sequence, budget: int) -> tuple[list[int], int, int]:
        """Local prefix hits, tokens to import from the store, tokens to compute (at most
        ``budget``) for admitting ``seq``."""
        block_size = self.blocks.block_size
        if seq.host_block_table:  # swapped out: its computed tokens come back by copy
            num_tokens = seq.num_tokens - seq.num_swapped_tokens
            return [], seq.num_swapped_tokens, min(num_tokens, budget)
        hits = self.blocks.match_prefix(seq)
        import_tokens = 0
        if seq.kv_import is not None:
            covered = min(len(seq.kv_import) * block_size, len(seq.prompt_token_ids))
            import_tokens = max(0, covered - len(hits) * block_size)
        num_tokens = seq.num_uncomputed_tokens - len(hits) * block_size - import_tokens
        return hits, import_tokens, min(num_tokens, budget)

    def _admit(
        self, seq: Sequence, budget: int
    ) -> tuple[ScheduledChunk, BlockImport | None] | None:
        """Blocks for the next waiting request: local prefix hits are shared, blocks named in
        ``kv_import`` are filled from the store, and up to ``budget`` tokens are computed."""
        block_size = self.blocks.block_size
        hits, import_tokens, num_tokens = self._admission_need(seq, budget)
        if not self.blocks.can_allocate(seq, import_tokens + num_tokens, hits):
            if seq.kv_import is not None or seq.host_block_table:
                return None
            num_tokens = self._fit_admission(seq, num_tokens, hits)
            if num_tokens == 0:
                return None
        self.waiting.popleft()
        self.blocks.allocate(seq, import_tokens + num_tokens, hits)
        block_import = None
        if seq.host_block_table:
            self._swap_back_in(seq)
        elif import_tokens:
            first = len(hits)
            last = first + -(-import_tokens // block_size)
            block_import = BlockImport(
                seq,
                seq.block_table[first:last],
                seq.kv_import[first:last],  # type: ignore[index]
            )
            seq.num_computed_tokens += import_tokens
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = seq.num_computed_tokens
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return ScheduledChunk.next_for(seq, num_tokens), block_import

    def _reserve_decode(self, seq: Sequence, scheduled: set[Sequence]) -> bool:
        """A block slot for ``seq``'s next token, preempting the policy's victims (fcfs: the
        newest) among the running sequences not yet scheduled this step. Returns False when
        ``seq`` itself was preempted."""
        if self.blocks.has_room(seq, 1):
            return True
        while not self.blocks.can_allocate(seq, 1, []):
            victim = self.policy.victim([s for s in self.running if s not in scheduled])
            self._preempt(victim)
            self._short_of_blocks = True
            if victim is seq:
                return False
        self.blocks.allocate(seq, 1, [])
        return True

    def _fit_admission(self, seq: Sequence, num_tokens: int, hits: list[int]) -> int:
        """The largest first chunk (whole blocks) that fits the free blocks; 0 if none."""
        block_size = self.blocks.block_size
        while num_tokens > 0 and not self.blocks.can_allocate(seq, num_tokens, hits):
            num_tokens = (num_tokens - 1) // block_size * block_size
        return num_tokens

    def _fit(self, seq: Sequence, num_tokens: int) -> int:
        """How many of ``num_tokens`` more tokens the free blocks can hold for ``seq``."""
        block_size = self.blocks.block_size
        room = (len(seq.block_table) + self.blocks.num_free_blocks) * block_size
        return max(0, min(num_tokens, room - seq.num_computed_tokens))

    def requeue(self, seq: Sequence) -> None:
        """Puts an admitted sequence back at the front of the queue to be recomputed."""
        self._preempt(seq, may_swap=False)

    def _swap_back_in(self, seq: Sequence) -> None:
        """Copies of a resumed request's host blocks into the device blocks it now holds."""
        assert self.swap is not None
        host_ids = seq.host_block_table
        self._swap_in.extend(zip(seq.block_table[: len(host_ids)], host_ids, strict=True))
        for block_id in host_ids:
            self.swap.allocator.free(block_id)  # read this step, before any later swap-out
        seq.host_block_table = []
        seq.num_computed_tokens = seq.num_swapped_tokens
        seq.num_swapped_tokens = 0

    def _swap_out_of(self, seq: Sequence) -> None:
        """Moves the blocks of ``seq``'s computed tokens to host blocks (freed on device)."""
        assert self.swap is not None
        num_blocks = self.blocks.blocks_needed(seq.num_computed_tokens)
        host_ids = [self.swap.allocator.allocate() for _ in range(num_blocks)]
        self._swap_out.extend(zip(seq.block_table[:num_blocks], host_ids, strict=True))
        seq.host_block_table = host_ids
        seq.num_swapped_tokens = seq.num_computed_tokens

    def _preempt(self, seq: Sequence, may_swap: bool = True) -> None:
        self.running.remove(seq)
        if may_swap and self.swap is not None and self.swap.takes(seq, self.blocks):
            self._swap_out_of(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        seq.kv_import = None  # resume by recomputation: the store may have evicted the blocks
        self._preempted_this_step.append(seq)
        self.waiting.appendleft(seq)  # resumes before anything that arrived after it

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Retires a sequence however it ends, freeing every block it holds."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        if seq.host_block_table:
            assert self.swap is not None
            for block_id in seq.host_block_table:
                self.swap.allocator.free(block_id)
            seq.host_block_table, seq.num_swapped_tokens = [], 0
        self.policy.forget(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
