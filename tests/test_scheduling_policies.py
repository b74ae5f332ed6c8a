"""Exact plans under the priority and mlfq scheduling policies: admission order, preemption
victims with exact block ids, queue placement, demotion and promotion. Pure Python, no model
(the ``Driver`` of the fcfs plans)."""

from __future__ import annotations

from engine.config import MLFQConfig
from engine.scheduling_policy import MLFQPolicy
from engine.sequence import SequenceStatus
from tests.test_scheduler_plans import Driver, tokens


def test_priority_admits_lower_values_first_and_displaces_the_lowest_running() -> None:
    sim = Driver(budget=64, max_num_seqs=2, num_blocks=64, block_size=4, policy="priority")
    low1 = sim.add("L1", tokens(0, 4), max_tokens=8, priority=5)
    low2 = sim.add("L2", tokens(100, 4), max_tokens=8, priority=5)
    assert sim.step() == [("L1", 0, 4), ("L2", 0, 4)]
    sim.add("H", tokens(200, 4), max_tokens=2, priority=0)
    sim.add("M", tokens(300, 4), max_tokens=2, priority=1)
    sim.add("M2", tokens(400, 4), max_tokens=2, priority=1)
    # Both seats are taken by priority 5: H displaces L2 (the newest of the lowest), then M
    # displaces L1; M2 outranks nobody left running and waits, ahead of L1 and L2.
    assert sim.step() == [("H", 0, 4), ("M", 0, 4)]
    assert sim.last is not None and sim.last.preempted == [low2, low1]
    assert sim.running == ["H", "M"] and sim.waiting == ["M2", "L1", "L2"]
    assert low1.block_table == [] and low1.num_computed_tokens == 0
    assert sim.step() == [("H", 4, 5), ("M", 4, 5)]  # both finish
    assert sim.step() == [("M2", 0, 4), ("L1", 0, 5)]  # L1 recomputes its first token too
    while sim.scheduler.has_unfinished:
        sim.step()
    assert [len(s.output_token_ids) for s in (low1, low2)] == [8, 8]
    sim.assert_all_free()


def test_priority_equals_never_displace_each_other() -> None:
    sim = Driver(budget=64, max_num_seqs=1, num_blocks=64, block_size=4, policy="priority")
    sim.add("A", tokens(0, 4), max_tokens=3, priority=2)
    assert sim.step() == [("A", 0, 4)]
    sim.add("B", tokens(100, 4), max_tokens=1, priority=2)
    assert sim.step() == [("A", 4, 5)]
    assert sim.step() == [("A", 5, 6)]  # A finishes
    assert sim.step() == [("B", 0, 4)]
    sim.assert_all_free()


def _four_decodes(policy: str) -> Driver:
    """A (priority 1), B (3), C (3), D (2): one block each, one block free."""
    sim = Driver(budget=32, max_num_seqs=4, num_blocks=5, block_size=4, policy=policy)
    for index, (name, priority) in enumerate([("A", 1), ("B", 3), ("C", 3), ("D", 2)]):
        sim.add(name, tokens(100 * index, 4), max_tokens=4, priority=priority)
    expected = ["A", "B", "C", "D"] if policy == "fcfs" else ["A", "D", "B", "C"]  # in rank
    assert sim.step() == [(name, 0, 4) for name in expected]
    return sim


def test_priority_preempts_for_a_decode_block_lowest_then_newest() -> None:
    sim = _four_decodes("priority")
    a, d, b, c = sim.scheduler.running
    assert [s.block_table for s in (a, d, b, c)] == [[0], [1], [2], [3]]
    # Decodes reserve in rank order: A takes free block 4; D has none and preempts C (the
    # newest of priority 3), taking C's block 3; B has none and only itself to preempt.
    assert sim.step() == [("A", 4, 5), ("D", 4, 5)]
    assert (a.block_table, d.block_table) == ([0, 4], [1, 3])
    assert list(sim.blocks.allocator.free_queue) == [2]
    assert sim.last is not None and sim.last.preempted == [c, b]
    assert sim.waiting == ["B", "C"] and b.status is SequenceStatus.WAITING
    while sim.scheduler.has_unfinished:
        sim.step()
    sim.assert_all_free()


def test_fcfs_preempts_the_newest_on_the_same_workload() -> None:
    sim = _four_decodes("fcfs")
    a, b, c, d = sim.scheduler.running
    assert sim.step() == [("A", 4, 5), ("B", 4, 5)]  # D (newest) goes for B, C for itself
    assert (a.block_table, b.block_table) == ([0, 4], [1, 3])
    assert sim.last is not None and sim.last.preempted == [d, c]
    assert sim.waiting == ["C", "D"]


def test_a_waiting_request_takes_budget_before_running_prompts_it_outranks() -> None:
    plans = {}
    for policy in ("fcfs", "priority"):
        sim = Driver(budget=16, max_num_seqs=4, num_blocks=64, block_size=4, policy=policy)
        sim.add("L", tokens(0, 40), max_tokens=1, priority=5)
        assert sim.step() == [("L", 0, 16)]
        sim.add("H", tokens(500, 8), max_tokens=1, priority=0)
        plans[policy] = sim.step()
    assert plans["fcfs"] == [("L", 16, 32)]
    assert plans["priority"] == [("H", 0, 8), ("L", 16, 24)]


MLFQ = MLFQConfig(
    num_levels=3, base_quantum=2, quantum_growth=2, join_prompt_tokens=8, promotion_period=3
)


def mlfq_driver(max_num_seqs: int, budget: int = 32) -> Driver:
    return Driver(
        budget=budget, max_num_seqs=max_num_seqs, num_blocks=64, block_size=4, policy="mlfq",
        mlfq=MLFQ,
    )  # fmt: skip


def test_mlfq_skip_join_places_a_request_by_its_prompt_length() -> None:
    policy = MLFQPolicy(MLFQ)
    # Level 0 takes prompts up to 8 tokens, level 1 up to 16, the last level the rest.
    assert [policy.join_level(n) for n in (1, 8, 9, 16, 17, 10_000)] == [0, 0, 1, 1, 2, 2]
    assert [policy.quantum(level) for level in range(3)] == [2, 4, None]
    sim = mlfq_driver(max_num_seqs=4)
    for name, length in (("long", 20), ("mid", 12), ("short", 3)):
        sim.add(name, tokens(0, length), max_tokens=1)
    assert sim.waiting == ["long", "mid", "short"]
    assert sim.step() == [("short", 0, 3), ("mid", 0, 12), ("long", 0, 17)]  # in level order


def test_mlfq_demotes_after_each_levels_quantum_of_generated_tokens() -> None:
    sim = mlfq_driver(max_num_seqs=1)
    seq = sim.add("A", tokens(0, 4), max_tokens=10)
    policy = sim.scheduler.policy
    assert isinstance(policy, MLFQPolicy)
    levels = []
    for _ in range(9):
        sim.step()
        levels.append(policy.level(seq))
    # 2 tokens at level 0, 4 at level 1, the rest at the last level.
    assert levels == [0, 0, 1, 1, 1, 1, 2, 2, 2]
    sim.step()
    assert seq.is_finished and len(seq.output_token_ids) == 10
    sim.assert_all_free()


def test_mlfq_a_new_short_request_preempts_a_demoted_long_one() -> None:
    plans = {}
    for policy in ("fcfs", "mlfq"):
        sim = (
            mlfq_driver(max_num_seqs=1)
            if policy == "mlfq"
            else Driver(budget=32, max_num_seqs=1, num_blocks=64, block_size=4)
        )
        long = sim.add("L", tokens(0, 6), max_tokens=8)
        assert sim.step() == [("L", 0, 6)] and long.block_table == [0, 1]
        sim.step(), sim.step()  # two more tokens: L is at level 1 from the next step
        sim.add("S", tokens(100, 4), max_tokens=2)
        plans[policy] = [sim.step() for _ in range(4)]
        assert long.num_preemptions == (policy == "mlfq")
        if policy == "mlfq":  # L freed 1, 0 (tail first); S took 2 and 3 and freed them
            assert list(sim.blocks.allocator.free_queue)[-4:] == [1, 0, 3, 2]
            assert long.block_table == [4, 5, 6]
    assert plans["fcfs"] == [[("L", 8, 9)], [("L", 9, 10)], [("L", 10, 11)], [("L", 11, 12)]]
    # S outranks L (level 0 < 1): L is preempted; S runs to its end, then L recomputes its
    # 6 prompt and 3 output tokens.
    assert plans["mlfq"] == [[("S", 0, 4)], [("S", 4, 5)], [("L", 0, 9)], [("L", 9, 10)]]


def test_mlfq_promotes_a_starved_request_to_level_zero() -> None:
    sim = mlfq_driver(max_num_seqs=1, budget=16)
    short = sim.add("S", tokens(0, 4), max_tokens=10)  # level 0
    long = sim.add("L", tokens(100, 20), max_tokens=1)  # skip-joins level 2
    policy = sim.scheduler.policy
    assert isinstance(policy, MLFQPolicy)
    assert [sim.step() for _ in range(3)] == [[("S", 0, 4)], [("S", 4, 5)], [("S", 5, 6)]]
    assert (policy.level(short), policy.level(long)) == (1, 2)  # S demoted at step 3
    # L has not run for more than 3 steps: back to level 0, where it outranks S.
    assert sim.step() == [("L", 0, 16)]
    assert policy.level(long) == 0 and short.status is SequenceStatus.WAITING
    assert sim.step() == [("L", 16, 20)]
    assert long.is_finished
    while sim.scheduler.has_unfinished:
        sim.step()
    assert len(short.output_token_ids) == 10
    sim.assert_all_free()


def test_mlfq_a_promoted_request_preempts_level_zero_requests_that_did_not_starve() -> None:
    sim = mlfq_driver(max_num_seqs=1, budget=2)
    old = sim.add("O", tokens(0, 8), max_tokens=1)  # level 0; 4 steps of 2-token chunks
    long = sim.add("L", tokens(100, 20), max_tokens=1)  # skip-joins level 2
    policy = sim.scheduler.policy
    assert isinstance(policy, MLFQPolicy)
    assert [sim.step() for _ in range(3)] == [[("O", 0, 2)], [("O", 2, 4)], [("O", 4, 6)]]
    # L has waited longer than the period (3): promoted and starved, it outranks O although
    # both are now at level 0 and O came first, and takes O's seat (O recomputes).
    assert sim.step() == [("L", 0, 2)]
    assert policy.level(long) == 0 and sim.last is not None and sim.last.preempted == [old]
    assert old.num_computed_tokens == 0
    # O starves in turn, but one starved request never preempts another (no thrashing):
    # L keeps the seat to its end, then O runs.
    plan = []
    while sim.scheduler.has_unfinished:
        plan.append(sim.step())
    assert plan == [[("L", n, n + 2)] for n in range(2, 20, 2)] + [
        [("O", n, n + 2)] for n in range(0, 8, 2)
    ]
    sim.assert_all_free()


def test_mlfq_two_prompts_short_of_blocks_do_not_deadlock() -> None:
    """Found by the property test: a promoted request starts its prompt while an older one is
    half done, and each then waits for blocks the other holds. The policy's victim (the one
    that did not starve) gives its blocks back and recomputes."""
    sim = Driver(
        budget=2, max_num_seqs=2, num_blocks=6, block_size=1, policy="mlfq",
        mlfq=MLFQConfig(num_levels=1, join_prompt_tokens=1, promotion_period=2),
    )  # fmt: skip
    old = sim.add("A", tokens(0, 5), max_tokens=1)
    sim.add("B", tokens(100, 3), max_tokens=1)
    assert [sim.step() for _ in range(3)] == [[("A", 0, 2)], [("A", 2, 4)], [("B", 0, 2)]]
    assert sim.blocks.num_free_blocks == 0  # A holds 4, B 2; each needs one more
    assert sim.step() == [("B", 2, 3)]
    assert sim.last is not None and sim.last.preempted == [old]
    assert [sim.step() for _ in range(3)] == [[("A", 0, 2)], [("A", 2, 4)], [("A", 4, 5)]]
    assert not sim.scheduler.has_unfinished
    sim.assert_all_free()
