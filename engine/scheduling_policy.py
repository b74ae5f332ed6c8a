"""The order the scheduler serves requests in: a small strategy object it consults.

A policy orders the running batch and the waiting queue, picks the preemption victim, and
says whether a waiting request may displace running ones that rank below it. The scheduler
keeps the mechanics (token budget, chunked prefill, blocks); the policy only ranks.

- ``fcfs``: arrival order; the newest running request is preempted (Orca, vLLM's default).
- ``priority``: each request's ``priority``, lower first, then arrival; the lowest-priority
  running request is preempted, the newest among equals (vLLM's priority policy).
- ``mlfq``: FastServe's skip-join multi-level feedback queue at iteration granularity.
"""

from __future__ import annotations

from engine.config import SchedulerConfig
from engine.sequence import Sequence


class SchedulingPolicy:
    """First come, first served: the queues stay in the order the scheduler keeps them
    (arrival, a preempted request back at the front of the waiting queue)."""

    name = "fcfs"
    #: A waiting request may preempt running requests it outranks to get admitted.
    preempts_for_waiting = False

    def add(self, seq: Sequence) -> None:
        """``seq`` joins the waiting queue for the first time."""

    def forget(self, seq: Sequence) -> None:
        """``seq`` has left the scheduler for good."""

    def begin_step(self, seqs: list[Sequence]) -> None:
        """Called with every queued sequence before each step is scheduled."""

    def scheduled(self, seqs: list[Sequence]) -> None:
        """The sequences that run in the step just scheduled."""

    def order(self, seqs: list[Sequence]) -> list[Sequence]:
        """``seqs`` in the order they are served."""
        return seqs

    def outranks(self, seq: Sequence, other: Sequence) -> bool:
        """``seq`` is served strictly before ``other``."""
        return False

    def victim(self, candidates: list[Sequence]) -> Sequence:
        """The request to preempt among ``candidates`` (in running order)."""
        return candidates[-1]


def make_policy(config: SchedulerConfig) -> SchedulingPolicy:
    if config.policy != "fcfs":
        raise NotImplementedError(f"scheduling policy {config.policy!r} is not built yet")
    return SchedulingPolicy()
