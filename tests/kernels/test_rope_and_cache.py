"""Triton rope_and_cache against its torch reference: rotated q/k and the paged cache write."""

from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import torch

from kernels.rotary import rope_and_cache, rope_and_cache_ref

Poisoned = Callable[[], AbstractContextManager[None]]

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
MAX_POSITION = 512


def _cos_sin_cache(head_dim: int, device: torch.device) -> torch.Tensor:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.arange(MAX_POSITION, dtype=torch.float32)[:, None] * inv_freq  # (P, D / 2)
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(device)  # (P, D)


def _qkv_views(
    num_tokens: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as strided views of one fused QKV projection output, as the model passes them."""
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return (
        q.view(num_tokens, heads, head_dim),
        k.view(num_tokens, kv_heads, head_dim),
        v.view(num_tokens, kv_heads, head_dim),
    )


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2), (8, 2)])
@pytest.mark.parametrize("head_dim", [64, 32, 80])  # 80: half is not a power of two
@pytest.mark.parametrize("page", [16, 8])
def test_rope_and_cache_matches_reference(
    heads: int,
    kv_heads: int,
    head_dim: int,
    page: int,
    dtype: torch.dtype,
    device: torch.device,
    poisoned: Poisoned,
) -> None:
    num_tokens, num_blocks = 13, 4
    q, k, v = _qkv_views(num_tokens, heads, kv_heads, head_dim, dtype, device)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), device=device)
    # Distinct slots in random order; every third token is padding (slot -1, not cached).
    slots = torch.randperm(num_blocks * page, device=device)[:num_tokens]
    slots[::3] = -1
    cos_sin = _cos_sin_cache(head_dim, device)
    cache_shape = (num_blocks, page, kv_heads, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=device)
    k_cache_ref, v_cache_ref = k_cache.clone(), v_cache.clone()

    with poisoned():
        q_rot, k_rot = rope_and_cache(q, k, v, positions, cos_sin, k_cache, v_cache, slots)
    q_ref, k_ref = rope_and_cache_ref(q, k, v, positions, cos_sin, k_cache_ref, v_cache_ref, slots)

    tol = TOLERANCE[dtype]
    torch.testing.assert_close(q_rot, q_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(k_rot, k_ref, atol=tol, rtol=tol)
    # Slots outside slot_mapping must still be NaN: equal_nan compares them too.
    torch.testing.assert_close(k_cache, k_cache_ref, atol=tol, rtol=tol, equal_nan=True)
    torch.testing.assert_close(v_cache, v_cache_ref, atol=0, rtol=0, equal_nan=True)


def test_rope_and_cache_int32_indices(device: torch.device) -> None:
    q, k, v = _qkv_views(5, 2, 1, 32, torch.float32, device)
    positions = torch.tensor([0, 1, 2, 300, 511], dtype=torch.int32, device=device)
    slots = torch.tensor([3, 0, -1, 7, 1], dtype=torch.int32, device=device)
    cos_sin = _cos_sin_cache(32, device)
    k_cache = torch.zeros(2, 4, 1, 32, device=device)
    v_cache = torch.zeros_like(k_cache)
    k_cache_ref, v_cache_ref = k_cache.clone(), v_cache.clone()
    q_rot, k_rot = rope_and_cache(q, k, v, positions, cos_sin, k_cache, v_cache, slots)
    q_ref, k_ref = rope_and_cache_ref(
        q, k, v, positions.long(), cos_sin, k_cache_ref, v_cache_ref, slots.long()
    )
    torch.testing.assert_close(q_rot, q_ref)
    torch.testing.assert_close(k_rot, k_ref)
    torch.testing.assert_close(k_cache, k_cache_ref)
    torch.testing.assert_close(v_cache, v_cache_ref)


def test_rope_and_cache_rejects_mismatched_cache(device: torch.device) -> None:
    q, k, v = _qkv_views(3, 4, 2, 32, torch.float32, device)
    positions = torch.zeros(3, dtype=torch.long, device=device)
    slots = torch.zeros(3, dtype=torch.long, device=device)
    bad_cache = torch.zeros(2, 16, 4, 32, device=device)  # 4 kv heads, k has 2
    with pytest.raises(ValueError, match="k_cache"):
        rope_and_cache(q, k, v, positions, _cos_sin_cache(32, device), bad_cache, bad_cache, slots)


def test_rope_and_cache_rejects_wrong_cos_sin_width(device: torch.device) -> None:
    q, k, v = _qkv_views(3, 4, 2, 32, torch.float32, device)
    index = torch.zeros(3, dtype=torch.long, device=device)
    cache = torch.zeros(2, 16, 2, 32, device=device)
    with pytest.raises(ValueError, match="cos_sin_cache last dim"):
        rope_and_cache(q, k, v, index, _cos_sin_cache(64, device), cache, cache, index)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rope_and_cache_llama_shape_on_gpu(dtype: torch.dtype) -> None:
    device = torch.device("cuda")
    num_tokens, page = 1000, 16
    q, k, v = _qkv_views(num_tokens, 32, 8, 128, dtype, device)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), device=device)
    slots = torch.randperm(128 * page, device=device)[:num_tokens]
    cos_sin = _cos_sin_cache(128, device)
    k_cache = torch.zeros(128, page, 8, 128, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    k_cache_ref, v_cache_ref = k_cache.clone(), v_cache.clone()
    q_rot, _ = rope_and_cache(q, k, v, positions, cos_sin, k_cache, v_cache, slots)
    q_ref, _ = rope_and_cache_ref(q, k, v, positions, cos_sin, k_cache_ref, v_cache_ref, slots)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(q_rot, q_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(k_cache, k_cache_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(v_cache, v_cache_ref, atol=0, rtol=0)
