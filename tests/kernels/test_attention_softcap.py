"""Gemma 2 score soft-capping in both paged attention kernels, against the references, and
the references against a plain softmax(cap * tanh(s / cap)) written out here."""

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest
import torch

from kernels.paged_attention import (
    AttentionConfig,
    gather_kv,
    launch_paged_attention,
    launch_paged_decode_attention,
    paged_attention_ref,
    paged_decode_attention_ref,
)

Poisoned = Callable[[], AbstractContextManager[None]]
MakePagedKV = Callable[..., Any]

SEQ_LENS = [1, 23, 40, 9]
Q_LENS = [1, 23, 7, 1]
TILES = AttentionConfig(block_m=16, block_n=16, num_warps=4, num_stages=2)
# A small cap with large scores: most scores saturate, so an uncapped kernel fails clearly.
SOFTCAP = 2.0
SCALE = 1.0


def _cu(q_lens: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32).to(device)


@pytest.mark.parametrize("sliding_window", [None, 13])
def test_softcapped_prefill_matches_reference(
    sliding_window: int | None,
    dtype: torch.dtype,
    device: torch.device,
    make_paged_kv: MakePagedKV,
    poisoned: Poisoned,
    attention_tol: float,
) -> None:
    kv = make_paged_kv(SEQ_LENS, 2, 32, 8, dtype, device)
    q = torch.randn(sum(Q_LENS), 4, 32, dtype=dtype, device=device)
    cu = _cu(Q_LENS, device)
    with poisoned():
        out = launch_paged_attention(
            q, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.seq_lens, SCALE, sliding_window,
            TILES, softcap=SOFTCAP,
        )  # fmt: skip
    k_ref, v_ref = kv.for_reference()
    args = (q.float(), k_ref, v_ref, kv.block_tables, cu, kv.seq_lens, SCALE, sliding_window)
    expected = paged_attention_ref(*args, softcap=SOFTCAP)
    torch.testing.assert_close(out.float(), expected, atol=attention_tol, rtol=attention_tol)
    uncapped = paged_attention_ref(*args)
    assert (uncapped - expected).abs().max() > 0.1, "the cap must change these outputs"


@pytest.mark.parametrize("num_splits", [1, 3])
def test_softcapped_decode_matches_reference(
    num_splits: int,
    dtype: torch.dtype,
    device: torch.device,
    make_paged_kv: MakePagedKV,
    poisoned: Poisoned,
    attention_tol: float,
) -> None:
    kv = make_paged_kv(SEQ_LENS, 2, 32, 8, dtype, device)
    q = torch.randn(len(SEQ_LENS), 4, 32, dtype=dtype, device=device)
    config = AttentionConfig(block_m=16, block_n=16, num_splits=num_splits)
    with poisoned():
        out = launch_paged_decode_attention(
            q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, SCALE, None, config,
            softcap=SOFTCAP,
        )  # fmt: skip
    k_ref, v_ref = kv.for_reference()
    expected = paged_decode_attention_ref(
        q.float(), k_ref, v_ref, kv.block_tables, kv.seq_lens, SCALE, None, softcap=SOFTCAP
    )
    torch.testing.assert_close(out.float(), expected, atol=attention_tol, rtol=attention_tol)


def test_reference_caps_scores_before_the_softmax() -> None:
    torch.manual_seed(0)
    cache_k = torch.randn(2, 8, 1, 16) * 3
    cache_v = torch.randn(2, 8, 1, 16)
    table = torch.tensor([[0, 1]], dtype=torch.int32)
    q = torch.randn(1, 2, 16) * 3
    out = paged_decode_attention_ref(
        q, cache_k, cache_v, table, torch.tensor([13], dtype=torch.int32), 0.25, None, 5.0
    )
    k = gather_kv(cache_k, table[0], 13)[:, 0]  # (13, 16)
    v = gather_kv(cache_v, table[0], 13)[:, 0]
    scores = 5.0 * torch.tanh(q[0] @ k.T * 0.25 / 5.0)  # (heads, 13)
    torch.testing.assert_close(out[0], scores.softmax(-1) @ v)
