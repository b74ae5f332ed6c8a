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

import itertools

from engine.config import SchedulerConfig
from engine.sequence import Sequence

Rank = tuple[int, int]


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


class RankedPolicy(SchedulingPolicy):
    """Serves by a rank, lowest first; arrival order breaks ties, so the victim, the highest
    rank, is the newest among equals."""

    preempts_for_waiting = True

    def __init__(self) -> None:
        self._arrivals = itertools.count()
        self._arrival: dict[Sequence, int] = {}

    def add(self, seq: Sequence) -> None:
        self._arrival[seq] = next(self._arrivals)

    def forget(self, seq: Sequence) -> None:
        self._arrival.pop(seq, None)

    def level(self, seq: Sequence) -> int:
        raise NotImplementedError

    def rank(self, seq: Sequence) -> Rank:
        return self.level(seq), self._arrival[seq]

    def order(self, seqs: list[Sequence]) -> list[Sequence]:
        return sorted(seqs, key=self.rank)

    def outranks(self, seq: Sequence, other: Sequence) -> bool:
        return self.level(seq) < self.level(other)

    def victim(self, candidates: list[Sequence]) -> Sequence:
        return max(candidates, key=self.rank)


class PriorityPolicy(RankedPolicy):
    name = "priority"

    def level(self, seq: Sequence) -> int:
        return seq.priority


def make_policy(config: SchedulerConfig) -> SchedulingPolicy:
    if config.policy == "priority":
        return PriorityPolicy()
    if config.policy == "mlfq":
        raise NotImplementedError("scheduling policy 'mlfq' is not built yet")
    return SchedulingPolicy()
