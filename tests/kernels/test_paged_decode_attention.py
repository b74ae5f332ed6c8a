"""Triton paged_decode_attention (GQA, single pass and split-K) against the reference."""

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest
import torch

from kernels.paged_attention import (
    AttentionConfig,
    decode_num_splits,
    launch_paged_decode_attention,
    paged_decode_attention,
    paged_decode_attention_ref,
)

Poisoned = Callable[[], AbstractContextManager[None]]
MakePagedKV = Callable[..., Any]  # conftest.build_paged_kv

# Query heads per KV head 1, 3 and 4; few heads, since the interpreter runs every program.
GQA = [(2, 2), (3, 1), (8, 2)]
DIMS_AND_PAGES = [(64, 16), (32, 8)]
# A fresh sequence, exactly one page, lengths that end mid-page, and one long enough for
# several 16-key tiles per split.
SEQ_LENS = [1, 16, 37, 70, 9]


def _decode(
    q: torch.Tensor,
    kv: Any,
    scale: float,
    sliding_window: int | None,
    num_splits: int | None,
) -> torch.Tensor:
    config = AttentionConfig(block_n=16, num_warps=4, num_stages=2, num_splits=num_splits)
    return launch_paged_decode_attention(
        q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, scale, sliding_window, config
    )


def _reference(q: torch.Tensor, kv: Any, scale: float, sliding_window: int | None) -> torch.Tensor:
    k_ref, v_ref = kv.for_reference()
    return paged_decode_attention_ref(
        q.float(), k_ref, v_ref, kv.block_tables, kv.seq_lens, scale, sliding_window
    )


@pytest.mark.parametrize(("heads", "kv_heads"), GQA)
@pytest.mark.parametrize(("head_dim", "page"), DIMS_AND_PAGES)
@pytest.mark.parametrize("sliding_window", [None, 13])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_decode_attention_matches_reference(
    heads: int,
    kv_heads: int,
    head_dim: int,
    page: int,
    sliding_window: int | None,
    num_splits: int,
    dtype: torch.dtype,
    device: torch.device,
    make_paged_kv: MakePagedKV,
    poisoned: Poisoned,
    attention_tol: float,
) -> None:
    kv = make_paged_kv(SEQ_LENS, kv_heads, head_dim, page, dtype, device)
    q = torch.randn(len(SEQ_LENS), heads, head_dim, dtype=dtype, device=device)
    scale = head_dim**-0.5
    with poisoned():  # also poisons the split-K partial buffers
        out = _decode(q, kv, scale, sliding_window, num_splits)
    expected = _reference(q, kv, scale, sliding_window)
    torch.testing.assert_close(out.float(), expected, atol=attention_tol, rtol=attention_tol)


def test_paged_decode_attention_more_splits_than_tiles(
    dtype: torch.dtype,
    device: torch.device,
    make_paged_kv: MakePagedKV,
    poisoned: Poisoned,
    attention_tol: float,
) -> None:
    # 7 splits over sequences of 1..3 tiles: most splits are empty and must not contribute.
    kv = make_paged_kv([1, 20, 45], 1, 32, 8, dtype, device)
    q = torch.randn(3, 4, 32, dtype=dtype, device=device)
    with poisoned():
        out = _decode(q, kv, 0.2, None, 7)
    torch.testing.assert_close(
        out.float(), _reference(q, kv, 0.2, None), atol=attention_tol, rtol=attention_tol
    )


@pytest.mark.parametrize("sliding_window", [None, 40])
def test_paged_decode_attention_default_launch(
    sliding_window: int | None,
    dtype: torch.dtype,
    device: torch.device,
    make_paged_kv: MakePagedKV,
    poisoned: Poisoned,
    attention_tol: float,
) -> None:
    # Two sequences with a 300-token table: the wrapper picks split-K on its own.
    kv = make_paged_kv([300, 130], 2, 64, 16, dtype, device)
    q = torch.randn(2, 8, 64, dtype=dtype, device=device)
    with poisoned():
        out = paged_decode_attention(
            q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.125, sliding_window
        )
    expected = _reference(q, kv, 0.125, sliding_window)
    torch.testing.assert_close(out.float(), expected, atol=attention_tol, rtol=attention_tol)


def test_paged_decode_attention_zero_length_is_zero(
    device: torch.device, make_paged_kv: MakePagedKV
) -> None:
    # seq_len 0 marks batch padding (e.g. a captured graph's spare rows): zeros, not NaN.
    kv = make_paged_kv([5, 1], 1, 32, 8, torch.float32, device)
    seq_lens = torch.tensor([5, 0], dtype=torch.int32, device=device)
    q = torch.randn(2, 2, 32, device=device)
    for num_splits in (1, 2):
        config = AttentionConfig(block_n=16, num_splits=num_splits)
        out = launch_paged_decode_attention(
            q, kv.k_cache, kv.v_cache, kv.block_tables, seq_lens, 1.0, None, config
        )
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert not out[0].isnan().any()


def test_decode_num_splits_fills_the_device() -> None:
    cpu = torch.device("cpu")  # the heuristic assumes an H100's 132 SMs off-GPU
    assert decode_num_splits(64, 8, 8192, cpu) == 1  # 512 programs already fill the SMs
    assert decode_num_splits(4, 8, 8192, cpu) == 9  # 32 programs -> about 2 per SM
    assert decode_num_splits(1, 8, 200, cpu) == 1  # too short to be worth a second pass
    assert decode_num_splits(1, 8, 300, cpu) == 2  # at least 128 keys per split
    assert decode_num_splits(1, 1, 1 << 20, cpu) == 64  # capped


def test_paged_decode_attention_rejects_mismatched_batch(
    device: torch.device, make_paged_kv: MakePagedKV
) -> None:
    kv = make_paged_kv([4, 4], 1, 32, 8, torch.float32, device)
    q = torch.randn(3, 2, 32, device=device)
    with pytest.raises(ValueError, match="seq_lens has 2 entries"):
        paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 1.0)


def test_paged_decode_attention_rejects_bad_window(
    device: torch.device, make_paged_kv: MakePagedKV
) -> None:
    kv = make_paged_kv([4], 1, 32, 8, torch.float32, device)
    q = torch.randn(1, 2, 32, device=device)
    with pytest.raises(ValueError, match="sliding_window"):
        paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 1.0, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("sliding_window", [None, 1000])
@pytest.mark.parametrize("num_seqs", [3, 64])
def test_paged_decode_attention_long_context_on_gpu(
    heads: int,
    kv_heads: int,
    head_dim: int,
    sliding_window: int | None,
    num_seqs: int,
    dtype: torch.dtype,
    make_paged_kv: MakePagedKV,
    attention_tol: float,
) -> None:
    device = torch.device("cuda")
    seq_lens = torch.randint(1, 4097, (num_seqs,)).tolist()
    seq_lens[0] = 4096
    kv = make_paged_kv(seq_lens, kv_heads, head_dim, 16, dtype, device)
    q = torch.randn(num_seqs, heads, head_dim, dtype=dtype, device=device)
    scale = head_dim**-0.5
    out = paged_decode_attention(
        q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, scale, sliding_window
    )
    expected = _reference(q, kv, scale, sliding_window)
    torch.testing.assert_close(out.float(), expected, atol=attention_tol, rtol=attention_tol)
