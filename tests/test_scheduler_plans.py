"""Exact chunk plans of the scheduler: which tokens of which request run in each step, in which
blocks, in which order requests are admitted and preempted. Pure Python, no model: a small
driver applies each step the way ``Engine.step`` does."""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager
from engine.config import MLFQConfig, SchedulerConfig
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import FinishReason, Sequence, SequenceStatus
from engine.swap import SwapSpace
from kvstore.block_hash import hash_full_blocks

Plan = list[tuple[str, int, int]]


def fake_token(seq: Sequence) -> int:
    """A deterministic stand-in for the sampled token: a function of the sequence's content."""
    return (seq.token_ids[-1] * 31 + 7) % 1000


class Driver:
    """A scheduler and its block manager, stepped like ``Engine.step`` without a model."""

    def __init__(
        self,
        *,
        budget: int,
        max_num_seqs: int,
        num_blocks: int,
        block_size: int,
        prefix_caching: bool = False,
        policy: str = "fcfs",
        mlfq: MLFQConfig | None = None,
        swap_blocks: int = 0,
    ) -> None:
        self.blocks = BlockManager(num_blocks, block_size, b"plans", prefix_caching)
        config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            policy=policy,
            mlfq=mlfq or MLFQConfig(),
        )
        swap = SwapSpace(swap_blocks, lambda seq: True) if swap_blocks else None
        self.scheduler = Scheduler(config, self.blocks, swap)
        self.last: SchedulerOutput | None = None
        #: Block table of each request scheduled in the last step, as the model saw it.
        self.tables: dict[str, list[int]] = {}

    def add(
        self, request_id: str, prompt: list[int], max_tokens: int, priority: int = 0
    ) -> Sequence:
        params = SamplingParams(max_tokens=max_tokens)
        seq = Sequence(request_id, prompt, params, frozenset(), priority=priority)
        self.scheduler.add(seq)
        return seq

    def step(self) -> Plan:
        """Schedules one step, applies it, and returns its plan as (request, start, end)."""
        out = self.scheduler.schedule()
        self.last = out
        self.tables = {c.seq.request_id: list(c.seq.block_table) for c in out.chunks}
        for chunk in out.chunks:
            seq = chunk.seq
            seq.num_computed_tokens = chunk.end
            self.blocks.commit_computed(seq)
            if chunk.completes:
                seq.append_token(fake_token(seq), None)
                if len(seq.output_token_ids) >= seq.params.max_tokens:
                    self.scheduler.finish(seq, FinishReason.LENGTH)
        return [(c.seq.request_id, c.start, c.end) for c in out.chunks]

    @property
    def completes(self) -> list[bool]:
        assert self.last is not None
        return [c.completes for c in self.last.chunks]

    @property
    def waiting(self) -> list[str]:
        return [s.request_id for s in self.scheduler.waiting]

    @property
    def running(self) -> list[str]:
        return [s.request_id for s in self.scheduler.running]

    def assert_all_free(self) -> None:
        allocator = self.blocks.allocator
        assert allocator.num_used == 0 and set(allocator.ref_counts) == {0}
        assert not self.scheduler.has_unfinished


def tokens(start: int, count: int) -> list[int]:
    return list(range(start, start + count))


def test_long_prompt_fills_the_budget_then_the_next_prompt_takes_the_rest() -> None:
    """Sarathi-Serve: every step is filled up to the token budget; a prompt longer than the
    budget is split, and the next request starts in the space its last chunk leaves."""
    sim = Driver(budget=64, max_num_seqs=8, num_blocks=64, block_size=16)
    a = sim.add("A", tokens(0, 100), max_tokens=3)
    b = sim.add("B", tokens(500, 30), max_tokens=3)

    assert sim.step() == [("A", 0, 64)]
    assert sim.completes == [False]
    assert a.block_table == [0, 1, 2, 3] and sim.waiting == ["B"]

    assert sim.step() == [("A", 64, 100), ("B", 0, 28)]  # 36 + 28 = the whole budget
    assert sim.completes == [True, False]
    assert a.block_table == [0, 1, 2, 3, 4, 5, 6] and b.block_table == [7, 8]
    assert len(a.output_token_ids) == 1 and b.output_token_ids == []

    # A's first decode goes first, then B's last two prompt tokens.
    assert sim.step() == [("A", 100, 101), ("B", 28, 30)]
    assert sim.completes == [True, True]
    assert sim.step() == [("A", 101, 102), ("B", 30, 31)]
    assert a.is_finished and a.block_table == [] and len(a.output_token_ids) == 3
    assert sim.step() == [("B", 31, 32)]
    assert b.is_finished and len(b.output_token_ids) == 3
    assert sim.step() == []
    sim.assert_all_free()


def test_decodes_are_never_skipped_while_a_long_prompt_is_chunked() -> None:
    sim = Driver(budget=32, max_num_seqs=4, num_blocks=100, block_size=8)
    short = [sim.add(name, tokens(100 * i, 5), max_tokens=20) for i, name in enumerate("abc")]
    assert sim.step() == [("a", 0, 5), ("b", 0, 5), ("c", 0, 5)]
    long_prompt = sim.add("L", tokens(1000, 300), max_tokens=2)
    # Every step: one token for each decode, the remaining 29 of the budget for the prompt.
    for index in range(11):
        decode = [(s.request_id, 5 + index, 6 + index) for s in short]
        start = 29 * index
        end = min(start + 29, 300)
        assert sim.step() == [*decode, ("L", start, end)]
        assert sim.completes == [True, True, True, end == 300]
    assert long_prompt.output_token_ids and len(long_prompt.block_table) == 38  # ceil(300 / 8)
    assert sim.step() == [("a", 16, 17), ("b", 16, 17), ("c", 16, 17), ("L", 300, 301)]
    assert long_prompt.is_finished
    while sim.scheduler.has_unfinished:
        sim.step()
    assert all(len(s.output_token_ids) == 20 for s in short)
    sim.assert_all_free()


def test_block_tables_prefix_hits_and_least_recently_freed_eviction() -> None:
    sim = Driver(budget=32, max_num_seqs=4, num_blocks=6, block_size=4, prefix_caching=True)
    allocator = sim.blocks.allocator
    a = sim.add("A", tokens(0, 10), max_tokens=3)
    assert sim.step() == [("A", 0, 10)]
    assert a.block_table == [0, 1, 2]
    # Blocks 0 and 1 are full and computed, so they are named in the prefix cache; 2 is not.
    a_hashes = hash_full_blocks(a.prompt_token_ids, 4, b"plans")
    assert allocator.lookup(a_hashes[0]) == 0 and allocator.lookup(a_hashes[1]) == 1

    b = sim.add("B", [*tokens(0, 8), 50, 51, 52], max_tokens=1)
    # B shares A's two full blocks and computes only its own 3 tokens, in a fresh block 3.
    assert sim.step() == [("A", 10, 11), ("B", 8, 11)]
    assert sim.tables == {"A": [0, 1, 2], "B": [0, 1, 3]} and b.num_cached_tokens == 8
    assert b.is_finished  # one token asked for; its blocks are released, hashes kept
    assert allocator.ref_counts == [1, 1, 1, 0, 0, 0]

    assert sim.step() == [("A", 11, 12)]
    assert a.is_finished
    sim.assert_all_free()
    # Freed back to front: never-used 4 and 5 first, then B's 3, then A's 2, 1, 0.
    assert list(allocator.free_queue) == [4, 5, 3, 2, 1, 0]

    # The same prompt again: the cached head blocks are revived, the rest recomputed.
    again = sim.add("A2", tokens(0, 10), max_tokens=1)
    assert sim.step() == [("A2", 8, 10)]
    assert sim.tables == {"A2": [0, 1, 4]} and again.num_cached_tokens == 8
    assert list(allocator.free_queue) == [5, 3, 2, 4, 1, 0]

    # A request that needs every other block evicts least recently freed first: 5, 3, 2.
    big = sim.add("big", tokens(700, 12), max_tokens=1)
    assert sim.step() == [("big", 0, 12)]
    assert sim.tables == {"big": [5, 3, 2]} and big.is_finished
    assert allocator.lookup(a_hashes[0]) == 0  # the head blocks outlive the tail
    sim.assert_all_free()


def test_preempts_the_newest_resumes_it_first_and_recomputes_it() -> None:
    sim = Driver(budget=32, max_num_seqs=4, num_blocks=6, block_size=4)
    a, b, c = (sim.add(name, tokens(100 * i, 8), max_tokens=4) for i, name in enumerate("ABC"))
    assert sim.step() == [("A", 0, 8), ("B", 0, 8), ("C", 0, 8)]
    assert (a.block_table, b.block_table, c.block_table) == ([0, 1], [2, 3], [4, 5])
    c_first_token = c.output_token_ids[0]

    d = sim.add("D", tokens(900, 3), max_tokens=2)
    # A's and B's next tokens need a third block each and none is free: C, the newest, is
    # preempted; its blocks (freed back to front: 5 then 4) go to A and B.
    assert sim.step() == [("A", 8, 9), ("B", 8, 9)]
    assert (a.block_table, b.block_table, c.block_table) == ([0, 1, 5], [2, 3, 4], [])
    assert c.status is SequenceStatus.WAITING and c.num_preemptions == 1
    assert c.num_computed_tokens == 0 and c.output_token_ids == [c_first_token]
    assert sim.waiting == ["C", "D"]  # ahead of D, which arrived after it
    assert sim.running == ["A", "B"]

    assert sim.step() == [("A", 9, 10), ("B", 9, 10)]
    assert sim.step() == [("A", 10, 11), ("B", 10, 11)]  # both finish: 4 tokens each
    assert a.is_finished and b.is_finished

    # C resumes first: its 8 prompt tokens and its first output are recomputed in one chunk,
    # which completes, so its second token is sampled now. D fills the rest of the budget.
    assert sim.step() == [("C", 0, 9), ("D", 0, 3)]
    assert sim.completes == [True, True]
    assert c.block_table == [5, 1, 0] and d.block_table == [4]
    assert sim.step() == [("C", 9, 10), ("D", 3, 4)]
    assert sim.step() == [("C", 10, 11)]
    assert c.is_finished and c.output_token_ids[0] == c_first_token
    assert len(c.output_token_ids) == 4 and len(d.output_token_ids) == 2
    assert [s.num_preemptions for s in (a, b, c, d)] == [0, 0, 1, 0]
    sim.assert_all_free()


def test_preempted_request_resumes_from_its_cached_head_block() -> None:
    """The victim's blocks are freed tail first, so its head block survives in the prefix cache
    and the resumed request recomputes only what was evicted."""
    sim = Driver(budget=32, max_num_seqs=4, num_blocks=7, block_size=4, prefix_caching=True)
    a, b, c = (sim.add(name, tokens(100 * i, 8), max_tokens=4) for i, name in enumerate("ABC"))
    assert sim.step() == [("A", 0, 8), ("B", 0, 8), ("C", 0, 8)]
    assert c.block_table == [4, 5]
    # A takes the one free block (6); B preempts C and takes C's tail block 5.
    assert sim.step() == [("A", 8, 9), ("B", 8, 9)]
    assert (a.block_table, b.block_table) == ([0, 1, 6], [2, 3, 5])
    assert c.num_preemptions == 1 and sim.waiting == ["C"]
    # C's head block is still free and named, but reviving it plus one more block is more
    # than the single free block: C waits.
    assert sim.step() == [("A", 9, 10), ("B", 9, 10)]
    assert sim.step() == [("A", 10, 11), ("B", 10, 11)]
    assert a.is_finished and b.is_finished

    assert sim.step() == [("C", 4, 9)]  # tokens 0..3 come from block 4
    # Block 4 revived; A's and B's freed blocks follow it in the free queue.
    assert c.block_table == [4, 6, 1] and c.num_cached_tokens == 0  # counted at first admission
    while sim.scheduler.has_unfinished:
        sim.step()
    assert len(c.output_token_ids) == 4
    sim.assert_all_free()


def test_max_num_seqs_admits_first_come_first_served() -> None:
    sim = Driver(budget=64, max_num_seqs=2, num_blocks=64, block_size=4)
    sim.add("A", tokens(0, 4), max_tokens=2)
    sim.add("B", tokens(100, 4), max_tokens=5)
    sim.add("C", tokens(200, 4), max_tokens=3)
    assert sim.step() == [("A", 0, 4), ("B", 0, 4)]  # budget left, but two seqs at most
    assert sim.waiting == ["C"]
    sim.add("D", tokens(300, 2), max_tokens=1)
    assert sim.step() == [("A", 4, 5), ("B", 4, 5)]  # A finishes
    assert sim.step() == [("B", 5, 6), ("C", 0, 4)]  # C before D, which came later
    assert sim.waiting == ["D"]
    assert sim.step() == [("B", 6, 7), ("C", 4, 5)]
    assert sim.step() == [("B", 7, 8), ("C", 5, 6)]  # both finish
    assert sim.step() == [("D", 0, 2)]
    sim.assert_all_free()


def test_request_that_does_not_fit_blocks_later_ones() -> None:
    """A decode-role request must import all of its prompt's blocks at admission; while they
    do not fit it waits, and a later request that would fit waits behind it."""
    sim = Driver(budget=16, max_num_seqs=4, num_blocks=4, block_size=4)
    sim.add("A", tokens(0, 6), max_tokens=3)  # holds 2 of the 4 blocks until it finishes
    assert sim.step() == [("A", 0, 6)]
    handed_off = Sequence(
        "B", tokens(100, 10), SamplingParams(max_tokens=3), frozenset(), output_token_ids=[7]
    )
    handed_off.kv_import = [b"x" * 16, b"y" * 16, b"z" * 16]  # 3 blocks; 2 are free
    sim.scheduler.add(handed_off)
    sim.add("C", tokens(200, 3), max_tokens=2)  # needs one block: would fit, must not jump
    assert sim.step() == [("A", 6, 7)]
    assert sim.waiting == ["B", "C"]
    assert sim.step() == [("A", 7, 8)]  # A finishes and frees blocks 1 and 0
    assert sim.step() == [("B", 10, 11), ("C", 0, 3)]
    assert sim.last is not None
    (block_import,) = sim.last.imports
    assert block_import.seq is handed_off and block_import.block_ids == [2, 3, 1]
    assert block_import.hashes == handed_off.kv_import
    assert handed_off.block_table == [2, 3, 1] and sim.scheduler.running[1].block_table == [0]
    while sim.scheduler.has_unfinished:
        sim.step()
    sim.assert_all_free()


@pytest.mark.parametrize(
    "prompt_len",
    [
        6,
        5,  # a one-token prompt remainder is still prefill: it must not preempt itself
    ],
)
def test_prefill_short_of_blocks_waits_and_keeps_its_kv(prompt_len: int) -> None:
    """A prompt in progress that cannot get a block waits for one, keeping what it computed,
    however many of its tokens remain."""
    sim = Driver(budget=4, max_num_seqs=2, num_blocks=3, block_size=4)
    d = sim.add("D", tokens(0, 3), max_tokens=3)
    p = sim.add("P", tokens(100, prompt_len), max_tokens=1)
    assert sim.step() == [("D", 0, 3), ("P", 0, 1)]
    assert sim.step() == [("D", 3, 4), ("P", 1, 4)]  # P has prompt_len - 4 tokens left
    # D's next token takes the last free block; P has none for its remainder and waits.
    assert sim.step() == [("D", 4, 5)]
    assert d.is_finished and p.block_table == [1] and p.num_computed_tokens == 4
    assert sim.step() == [("P", 4, prompt_len)]
    assert p.is_finished and p.num_preemptions == 0
    sim.assert_all_free()
