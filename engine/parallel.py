"""Tensor-parallel group of the model being built or run.

Layer types read the current group when they are constructed (``tensor_parallel(...)``
around model construction) and keep it; a process may hold a sharded engine beside unsharded
ones, so nothing here consults torch.distributed's global state. Outside any group a layer
is rank 0 of 1 and pays nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    #: The torch.distributed group of the ranks; None when size is 1.
    group: Any = None
    #: Ranks the experts of an MoE layer are split over (expert parallelism); the rest of
    #: the group's size shards each expert like a dense MLP. None: every rank (EP = TP).
    expert_parallel_size: int | None = None

    def __post_init__(self) -> None:
        ep = self.expert_parallel_size
        if ep is not None and (ep < 1 or self.size % ep):
            raise ValueError(f"expert-parallel size {ep} must divide the group size {self.size}")

    @property
    def experts_split(self) -> ExpertSplit:
        ep = self.expert_parallel_size or self.size
        expert_tp = self.size // ep
        return ExpertSplit(self.rank // expert_tp, ep, self.rank % expert_tp, expert_tp)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


@dataclass(frozen=True)
class ExpertSplit:
    """Where this rank sits for MoE layers: it holds the experts of slice ``ep_rank`` of
    ``ep_size``, each sharded ``tp_size`` ways (its shard ``tp_rank``)."""

    ep_rank: int
    ep_size: int
    tp_rank: int
    tp_size: int


SINGLE = TPGroup()
_current = SINGLE


@contextlib.contextmanager
def tensor_parallel(group: TPGroup) -> Iterator[TPGroup]:
    """Layers constructed inside take ``group``'s rank and size."""
    global _current
    previous, _current = _current, group
    try:
        yield group
    finally:
        _current = previous


def current_group() -> TPGroup:
    return _current


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by tensor-parallel size {denominator}")
    return numerator // denominator
