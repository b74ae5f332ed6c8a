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
from dataclasses import dataclass

from engine.config import MLFQConfig, SchedulerConfig
from engine.sequence import Sequence

Rank = tuple[int, ...]


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


@dataclass
class _Queue:
    """Where one request stands in the MLFQ."""

    level: int
    #: Its output length when it entered ``level`` (a quantum counts tokens from there).
    entry_tokens: int
    #: The step it last ran in (or arrived in).
    last_step: int
    #: Promoted for having waited a whole promotion period, until its level-0 quantum runs
    #: out: it is served before every other request of its level and may preempt them, so it
    #: runs in the step after its promotion unless older starved requests hold the seats.
    #: (Holding the rank for the whole quantum, not one step, keeps two starved requests from
    #: preempting each other in turn and losing their progress.)
    starved: bool = False


class MLFQPolicy(RankedPolicy):
    """Skip-join MLFQ (FastServe, Wu et al. 2023). A request joins the highest queue whose
    quantum covers its prompt (the prompt's length predicts its first iteration), is demoted
    one level each time it generates its level's quantum of tokens (quanta grow by
    ``quantum_growth`` per level), and goes back to level 0 when it has not run for
    ``promotion_period`` iterations, ahead of that level's other requests for its quantum.
    Lower levels are served first; within a level, the starved, then arrival order."""

    name = "mlfq"

    def __init__(self, config: MLFQConfig) -> None:
        super().__init__()
        self.config = config
        self.step = 0
        self._queues: dict[Sequence, _Queue] = {}

    def quantum(self, level: int) -> int | None:
        """Generated tokens a request may produce at ``level``; None: no limit (last level)."""
        if level >= self.config.num_levels - 1:
            return None
        return self.config.base_quantum * self.config.quantum_growth**level

    def join_level(self, num_prompt_tokens: int) -> int:
        """Skip-join: the first level whose prompt limit covers the prompt."""
        limit = self.config.join_prompt_tokens
        level = 0
        while num_prompt_tokens > limit and level < self.config.num_levels - 1:
            limit *= self.config.quantum_growth
            level += 1
        return level

    def add(self, seq: Sequence) -> None:
        super().add(seq)
        level = self.join_level(len(seq.prompt_token_ids))
        self._queues[seq] = _Queue(level, len(seq.output_token_ids), self.step)

    def forget(self, seq: Sequence) -> None:
        super().forget(seq)
        self._queues.pop(seq, None)

    def level(self, seq: Sequence) -> int:
        return self._queues[seq].level

    def _standing(self, seq: Sequence) -> tuple[int, int]:
        queue = self._queues[seq]
        return queue.level, 0 if queue.starved else 1

    def rank(self, seq: Sequence) -> Rank:
        return (*self._standing(seq), self._arrival[seq])

    def outranks(self, seq: Sequence, other: Sequence) -> bool:
        return self._standing(seq) < self._standing(other)

    def begin_step(self, seqs: list[Sequence]) -> None:
        self.step += 1
        for seq in seqs:
            queue = self._queues[seq]
            num_output = len(seq.output_token_ids)
            if self.step - queue.last_step > self.config.promotion_period:
                queue.level, queue.entry_tokens = 0, num_output  # starved: back to the top
                queue.last_step, queue.starved = self.step, True
                continue
            quantum = self.quantum(queue.level)
            if quantum is not None and num_output - queue.entry_tokens >= quantum:
                queue.level, queue.entry_tokens = queue.level + 1, num_output
                queue.starved = False

    def scheduled(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self._queues[seq].last_step = self.step


def make_policy(config: SchedulerConfig) -> SchedulingPolicy:
    if config.policy == "priority":
        return PriorityPolicy()
    if config.policy == "mlfq":
        return MLFQPolicy(config.mlfq)
    return SchedulingPolicy()
