"""Exact plans under the priority and mlfq scheduling policies: admission order, preemption
victims with exact block ids, queue placement, demotion and promotion. Pure Python, no model
(the ``Driver`` of the fcfs plans)."""

from __future__ import annotations

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
