"""Kernel tests run on CUDA when it is available, else under the Triton interpreter on CPU.

TRITON_INTERPRET is read when ``@triton.jit`` decorates a kernel, i.e. when a ``kernels``
module is first imported, so it must be set before anything imports that package. This file
sets it for runs of tests/kernels alone; the root tests/conftest.py must do the same for the
whole suite, because other tests can import ``kernels`` before this directory is collected.
"""

import contextlib
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The interpreter computes in numpy, which has no bfloat16: float32 on CPU.
DTYPES = [torch.bfloat16, torch.float16] if DEVICE.type == "cuda" else [torch.float32]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(params=DTYPES, ids=lambda dtype: str(dtype).removeprefix("torch."))
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    """Fresh inputs per test case, reproducible from its node id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _poisoned(allocate: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        tensor = allocate(*args, **kwargs)
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
        return tensor

    return wrapper


@pytest.fixture
def poisoned(
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """``with poisoned(): out = op(...)`` makes every float torch.empty / torch.empty_like
    inside the block come back NaN-filled, so an output element (or split-K partial) the
    kernel forgets to write shows up as NaN instead of stale memory that happens to match."""

    @contextlib.contextmanager
    def context() -> Iterator[None]:
        with monkeypatch.context() as patch:
            patch.setattr(torch, "empty", _poisoned(torch.empty))
            patch.setattr(torch, "empty_like", _poisoned(torch.empty_like))
            yield

    return context


@dataclass(frozen=True)
class PagedKV:
    """A paged K/V cache holding random keys and values for ``seq_lens``. Pages are scattered
    over shuffled physical blocks; block 0 is never used (it is the padding entry of
    block_tables) and every slot not holding a live token is NaN."""

    k_cache: torch.Tensor  # (num_blocks, page, kv_heads, head_dim)
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 (num_seqs, max_pages + 1), padded with 0
    seq_lens: torch.Tensor  # int32 (num_seqs,)

    def for_reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 caches with NaN replaced by 0: the decode reference reads (and masks) the
        padding slots, and 0 * NaN would poison its output."""
        return self.k_cache.float().nan_to_num(0.0), self.v_cache.float().nan_to_num(0.0)


def build_paged_kv(
    seq_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    page: int,
    dtype: torch.dtype,
    device: torch.device,
) -> PagedKV:
    pages_per_seq = [(n + page - 1) // page for n in seq_lens]
    num_blocks = 1 + sum(pages_per_seq) + 2  # block 0 for padding, two spare blocks
    physical = (torch.randperm(num_blocks - 1) + 1).tolist()
    shape = (num_blocks, page, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    # One spare column so every row carries padding entries, as engine tables do.
    block_tables = torch.zeros((len(seq_lens), max(pages_per_seq) + 1), dtype=torch.int32)
    for seq, (seq_len, num_pages) in enumerate(zip(seq_lens, pages_per_seq, strict=True)):
        pages = [physical.pop() for _ in range(num_pages)]
        block_tables[seq, :num_pages] = torch.tensor(pages, dtype=torch.int32)
        positions = torch.arange(seq_len)
        slots = torch.tensor(pages, dtype=torch.long)[positions // page] * page + positions % page
        for cache in (k_cache, v_cache):
            values = torch.randn(seq_len, num_kv_heads, head_dim, dtype=dtype)
            cache.view(-1, num_kv_heads, head_dim)[slots.to(device)] = values.to(device)
    return PagedKV(
        k_cache,
        v_cache,
        block_tables.to(device),
        torch.tensor(seq_lens, dtype=torch.int32, device=device),
    )


@pytest.fixture
def make_paged_kv() -> Callable[..., PagedKV]:
    return build_paged_kv


# Attention kernels are compared with the float32 reference: low-precision runs round P to
# the input dtype for the P @ V product, so allow a few ulps of it.
ATTENTION_TOLERANCE = {
    torch.float32: 2e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}


@pytest.fixture
def attention_tol(dtype: torch.dtype) -> float:
    """atol = rtol for attention outputs of ``dtype``."""
    return ATTENTION_TOLERANCE[dtype]
