"""The scheduler's invariants under the priority and mlfq policies, over random workloads
(hypothesis; the workloads and checks of ``test_scheduler_properties``): budgets hold every
step, no block is leaked or held twice, every token is computed at most once per life, every
request ends with all its tokens, and under mlfq a request that has not run for longer than
the promotion period is back in level 0. Pure Python, no model."""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine.config import MLFQConfig, SchedulerConfig
from engine.sequence import FinishReason
from tests.test_scheduler_properties import Workload, run, workloads

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_finished(workload: Workload, config: SchedulerConfig) -> dict[str, int]:
    seqs, tracker, _ = run(workload, config)
    event(f"preempted: {any(s.num_preemptions for s in seqs)}")
    for seq, request in zip(seqs, workload.requests, strict=True):
        assert seq.finish_reason is FinishReason.LENGTH
        assert len(seq.output_token_ids) == request.max_tokens
        counts = tracker.counts[seq.request_id]
        assert len(counts) == len(request.prompt) + request.max_tokens - 1
        assert all(n <= 1 + seq.num_preemptions for n in counts)
    return tracker.max_gaps


@SETTINGS
@given(workloads())
def test_priority_keeps_every_invariant(workload: Workload) -> None:
    check_finished(workload, SchedulerConfig(policy="priority"))


@SETTINGS
@given(workloads(), st.integers(1, 3), st.integers(1, 4), st.integers(1, 40), st.integers(2, 12))
def test_mlfq_keeps_every_invariant_and_nobody_starves(
    workload: Workload, num_levels: int, base_quantum: int, join: int, period: int
) -> None:
    mlfq = MLFQConfig(
        num_levels=num_levels, base_quantum=base_quantum, join_prompt_tokens=join,
        promotion_period=period,
    )  # fmt: skip
    # run() checks every step that a request idle for longer than the period is at level 0.
    gaps = check_finished(workload, SchedulerConfig(policy="mlfq", mlfq=mlfq))
    event(f"longest idle stretch beyond the period: {max(0, max(gaps.values()) - period)}")


@SETTINGS
@given(workloads(), st.sampled_from(["fcfs", "priority", "mlfq"]), st.integers(1, 24))
def test_swapping_keeps_every_invariant(workload: Workload, policy: str, swap_blocks: int) -> None:
    """Swapped-out requests come back with exactly their own K/V (run() checks the context
    of every chunk against a shadow copy moved as the engine moves blocks) and host blocks
    are never leaked or shared."""
    seqs, tracker, _ = run(workload, SchedulerConfig(policy=policy), swap_blocks)
    event(f"swapped: {any(s.num_preemptions for s in seqs)}")
    for seq, request in zip(seqs, workload.requests, strict=True):
        assert len(seq.output_token_ids) == request.max_tokens
        assert all(n <= 1 + seq.num_preemptions for n in tracker.counts[seq.request_id])
