"""Triton paged_attention (varlen causal prefill over the paged cache) against the reference."""

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest
import torch

from kernels.paged_attention import (
    AttentionConfig,
    launch_paged_attention,
    paged_attention,
    paged_attention_ref,
)

Poisoned = Callable[[], AbstractContextManager[None]]
MakePagedKV = Callable[..., Any]  # conftest.build_paged_kv

# Query heads per KV head 1, 3 and 4; few heads, since the interpreter runs every program.
GQA = [(2, 2), (3, 1), (8, 2)]
# (head_dim, page): pages of 16 hold one 16-key tile, pages of 8 half of one.
DIMS_AND_PAGES = [(64, 16), (32, 8)]
# One batch mixing every kind of chunk: a 1-token prompt, a full prefill of 23 tokens (not a
# page multiple), continuations of cached prefixes (7 new of 40, 16 new of 33), a single new
# token after a prefix, and a sequence with no new tokens this step.
SEQ_LENS = [1, 23, 40, 9, 33, 5]
Q_LENS = [1, 23, 7, 1, 16, 0]
# Small tiles so that sequences span several query tiles and KV tiles under the interpreter.
SMALL_TILES = AttentionConfig(block_m=16, block_n=16, num_warps=4, num_stages=2)


def _queries(
    q_lens: list[int], heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Strided q (a slice of a wider projection, as in a fused QKV) and cu_seqlens_q."""
    total = sum(q_lens)
    q = torch.randn(total, heads + 2, head_dim, dtype=dtype, device=device)[:, :heads]
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, cu.to(device)


def _reference(
    q: torch.Tensor,
    kv: Any,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    k_ref, v_ref = kv.for_reference()
    return paged_attention_ref(
        q.float(), k_ref, v_ref, kv.block_tables, cu_seqlens_q, kv.seq_lens, scale, sliding_window
    )


@pytest.mark.parametrize(("heads", "kv_heads"), GQA)
@pytest.mark.parametrize(("head_dim", "page"), DIMS_AND_PAGES)
@pytest.mark.parametrize("sliding_window", [None, 13])
def test_paged_attention_matches_reference(
    heads: int,
    kv_heads: int,
    head_dim: int,
    page: int,
    sliding_window: int | None,
    dtype: torch.dtype,
    device: torch.device,
    make_paged_kv: MakePagedKV,
    poisoned: Poisoned,
    attention_tol: float,
) -> None:
    kv = make_paged_kv(SEQ_LENS, kv_heads, head_dim, page, dtype, device)
    q, cu = _queries(Q_LENS, heads, head_dim, dtype, device)
    scale = head_dim**-0.5
    with poisoned():
        out = launch_paged_attention(
            q, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.seq_lens, scale, sliding_window,
            SMALL_TILES,
        )  # fmt: skip
    expected = _reference(q, kv, cu, scale, sliding_window)
    torch.testing.assert_close(out.float(), expected, atol=attention_tol, rtol=attention_tol)


@pytest.mark.parametrize("sliding_window", [None, 20])
def test_paged_attention_default_launch(
    sliding_window: int | None,
    dtype: torch.dtype,
    device: torch.device,
    make_paged_kv: MakePagedKV,
    poisoned: Poisoned,
    attention_tol: float,
) -> None:
    # The public wrapper's own tiles (128 query rows, 64-key tiles over 16-token pages).
    seq_lens, q_lens = [150, 1, 70], [150, 1, 30]
    kv = make_paged_kv(seq_lens, 2, 64, 16, dtype, device)
    q, cu = _queries(q_lens, 4, 64, dtype, device)
    with poisoned():
        out = paged_attention(
            q, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.seq_lens, 0.125, sliding_window
        )
    expected = _reference(q, kv, cu, 0.125, sliding_window)
    torch.testing.assert_close(out.float(), expected, atol=attention_tol, rtol=attention_tol)


def test_paged_attention_rejects_bad_cu_seqlens(
    device: torch.device, make_paged_kv: MakePagedKV
) -> None:
    kv = make_paged_kv([4, 4], 2, 32, 8, torch.float32, device)
    q, _ = _queries([4, 4], 2, 32, torch.float32, device)
    cu = torch.tensor([0, 8], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="cu_seqlens_q has 2 entries"):
        paged_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.seq_lens, 1.0)


def test_paged_attention_rejects_indivisible_heads(
    device: torch.device, make_paged_kv: MakePagedKV
) -> None:
    kv = make_paged_kv([4], 2, 32, 8, torch.float32, device)
    q, cu = _queries([4], 3, 32, torch.float32, device)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.seq_lens, 1.0)


def test_paged_attention_rejects_cache_dtype_mismatch(
    device: torch.device, make_paged_kv: MakePagedKV
) -> None:
    kv = make_paged_kv([4], 2, 32, 8, torch.float32, device)
    q, cu = _queries([4], 2, 32, torch.float64, device)
    with pytest.raises(ValueError, match="q dtype"):
        paged_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.seq_lens, 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("heads", "kv_heads"), [(32, 8), (12, 4)])
@pytest.mark.parametrize("head_dim", [128, 64])
@pytest.mark.parametrize("sliding_window", [None, 300])
def test_paged_attention_long_chunks_on_gpu(
    heads: int,
    kv_heads: int,
    head_dim: int,
    sliding_window: int | None,
    dtype: torch.dtype,
    make_paged_kv: MakePagedKV,
    attention_tol: float,
) -> None:
    device = torch.device("cuda")
    seq_lens, q_lens = [1500, 777, 2048, 1], [1500, 256, 512, 1]
    kv = make_paged_kv(seq_lens, kv_heads, head_dim, 16, dtype, device)
    q, cu = _queries(q_lens, heads, head_dim, dtype, device)
    scale = head_dim**-0.5
    out = paged_attention(
        q, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.seq_lens, scale, sliding_window
    )
    expected = _reference(q, kv, cu, scale, sliding_window)
    torch.testing.assert_close(out.float(), expected, atol=attention_tol, rtol=attention_tol)
