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
