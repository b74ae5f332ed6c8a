"""Rotary position embedding (rotate-half / NeoX layout) fused with the paged KV-cache write."""

import torch
import triton
import triton.language as tl

from kernels._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_launchable,
    check_tensor,
    require,
)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope_ref(
    x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> torch.Tensor:
    """x: (T, heads, head_dim); positions: (T,); cos_sin_cache: (max_pos, head_dim) float32 with
    cos(p * inv_freq) in the first half of the last dim and sin in the second."""
    cos_half, sin_half = cos_sin_cache[positions].chunk(2, dim=-1)  # (T, head_dim / 2) each
    cos = torch.cat((cos_half, cos_half), dim=-1).unsqueeze(1).to(x.dtype)  # (T, 1, head_dim)
    sin = torch.cat((sin_half, sin_half), dim=-1).unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


def write_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter k, v (T, kv_heads, head_dim) into caches (num_blocks, block_size, kv_heads,
    head_dim) at slot = block_id * block_size + offset; slots < 0 are skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[keep].to(v_cache.dtype))


def rope_and_cache_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q (T, heads, D) and k (T, kv_heads, D), writes rotated k and v into the paged
    cache, and returns (q_rotated, k_rotated)."""
    q_rot = apply_rope_ref(q, positions, cos_sin_cache)
    k_rot = apply_rope_ref(k, positions, cos_sin_cache)
    write_kv_ref(k_rot, v, k_cache, v_cache, slot_mapping)
    return q_rot, k_rot


# ---------------------------------------------------------------------------------------------
# Triton implementation: one program per token rotates all of its q and k heads, then writes
# the rotated k and the v of that token into its cache slot.


@triton.jit
def _round_to(x: tl.tensor, dtype: tl.constexpr) -> tl.tensor:
    """Round float32 values to ``dtype`` and back, reproducing the reference's rounding."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _rotate_heads(
    src_ptr: tl.tensor,
    dst_ptr: tl.tensor,
    num_heads: tl.tensor,
    stride_src_h: tl.tensor,
    stride_dst_h: tl.tensor,
    cos: tl.tensor,
    sin: tl.tensor,
    HALF_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor]:
    """Rotates the (heads, head_dim) rows of one token and returns both rotated
    (BLOCK_H, BLOCK_HALF) halves for the caller to reuse in the cache write."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < num_heads) & (cols < HALF_DIM)
    src = src_ptr + heads * stride_src_h + cols
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF_DIM, mask=mask, other=0.0)
    dtype: tl.constexpr = src_ptr.dtype.element_ty
    # rotate_half(x) = (-x2, x1); the reference multiplies in the activation dtype with cos
    # and sin already rounded to it, rounding each product and the sum.
    cos_r = _round_to(cos, dtype)[None, :]
    sin_r = _round_to(sin, dtype)[None, :]
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    out1 = (_round_to(x1f * cos_r, dtype) - _round_to(x2f * sin_r, dtype)).to(dtype)
    out2 = (_round_to(x2f * cos_r, dtype) + _round_to(x1f * sin_r, dtype)).to(dtype)
    dst = dst_ptr + heads * stride_dst_h + cols
    tl.store(dst, out1, mask=mask)
    tl.store(dst + HALF_DIM, out2, mask=mask)
    return out1, out2


@triton.jit
def _rope_and_cache_kernel(
    q_ptr: tl.tensor,
    k_ptr: tl.tensor,
    v_ptr: tl.tensor,
    positions_ptr: tl.tensor,
    cos_sin_ptr: tl.tensor,
    k_cache_ptr: tl.tensor,
    v_cache_ptr: tl.tensor,
    slot_mapping_ptr: tl.tensor,
    q_out_ptr: tl.tensor,
    k_out_ptr: tl.tensor,
    num_heads: tl.tensor,
    num_kv_heads: tl.tensor,
    stride_q_t: tl.tensor,
    stride_q_h: tl.tensor,
    stride_k_t: tl.tensor,
    stride_k_h: tl.tensor,
    stride_v_t: tl.tensor,
    stride_v_h: tl.tensor,
    stride_cos_sin: tl.tensor,
    stride_kc_block: tl.tensor,
    stride_kc_slot: tl.tensor,
    stride_kc_head: tl.tensor,
    stride_vc_block: tl.tensor,
    stride_vc_slot: tl.tensor,
    stride_vc_head: tl.tensor,
    CACHE_BLOCK_SIZE: tl.constexpr,
    HALF_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_KV_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
) -> None:
    token = tl.program_id(0).to(tl.int64)
    half = tl.arange(0, BLOCK_HALF)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    cos = tl.load(cos_sin_ptr + pos * stride_cos_sin + half, mask=half < HALF_DIM, other=0.0)
    sin = tl.load(
        cos_sin_ptr + pos * stride_cos_sin + HALF_DIM + half, mask=half < HALF_DIM, other=0.0
    )
    # Rotated outputs are contiguous (T, heads, D): head stride is 2 * HALF_DIM.
    _rotate_heads(
        q_ptr + token * stride_q_t,
        q_out_ptr + token * num_heads * 2 * HALF_DIM,
        num_heads,
        stride_q_h,
        2 * HALF_DIM,
        cos,
        sin,
        HALF_DIM,
        BLOCK_H,
        BLOCK_HALF,
    )
    k1, k2 = _rotate_heads(
        k_ptr + token * stride_k_t,
        k_out_ptr + token * num_kv_heads * 2 * HALF_DIM,
        num_kv_heads,
        stride_k_h,
        2 * HALF_DIM,
        cos,
        sin,
        HALF_DIM,
        BLOCK_KV_H,
        BLOCK_HALF,
    )
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:  # negative slots mark tokens whose KV is not cached (padding)
        block = slot // CACHE_BLOCK_SIZE
        offset = slot % CACHE_BLOCK_SIZE
        heads = tl.arange(0, BLOCK_KV_H)[:, None]
        cols = half[None, :]
        mask = (heads < num_kv_heads) & (cols < HALF_DIM)
        k_dst = k_cache_ptr + block * stride_kc_block + offset * stride_kc_slot
        k_dst += heads * stride_kc_head + cols
        cache_dtype: tl.constexpr = k_cache_ptr.dtype.element_ty
        tl.store(k_dst, k1.to(cache_dtype), mask=mask)
        tl.store(k_dst + HALF_DIM, k2.to(cache_dtype), mask=mask)
        v_src = v_ptr + token * stride_v_t + heads * stride_v_h + cols
        v_dst = v_cache_ptr + block * stride_vc_block + offset * stride_vc_slot
        v_dst += heads * stride_vc_head + cols
        for part in tl.static_range(2):
            v = tl.load(v_src + part * HALF_DIM, mask=mask, other=0.0)
            tl.store(v_dst + part * HALF_DIM, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _check_rope_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    device = q.device
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, device=device)
    num_tokens, _, head_dim = q.shape
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=3, dtypes=(q.dtype,), device=device)
    require(k.shape == v.shape, "k {} and v {} differ", tuple(k.shape), tuple(v.shape))
    require(
        k.shape[0] == num_tokens and k.shape[2] == head_dim,
        "k/v {} must be (T={}, kv_heads, D={})",
        tuple(k.shape),
        num_tokens,
        head_dim,
    )
    require(head_dim % 2 == 0, "head_dim must be even for rotate-half RoPE, got {}", head_dim)
    check_tensor("positions", positions, ndim=1, dtypes=INDEX_DTYPES, device=device)
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=INDEX_DTYPES, device=device)
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        require(
            t.shape[0] == num_tokens, "{} has {} entries, q has {}", name, t.shape[0], num_tokens
        )
    check_tensor("cos_sin_cache", cos_sin_cache, ndim=2, dtypes=(torch.float32,), device=device)
    require(
        cos_sin_cache.shape[1] == head_dim,
        "cos_sin_cache last dim {} != head_dim {}",
        cos_sin_cache.shape[1],
        head_dim,
    )
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, cache, ndim=4, dtypes=FLOAT_DTYPES, device=device)
        require(
            cache.shape[2:] == k.shape[1:],
            "{} {} must be (blocks, block_size, {}, {})",
            name,
            tuple(cache.shape),
            k.shape[1],
            head_dim,
        )
    require(k_cache.shape == v_cache.shape, "k_cache and v_cache shapes differ")
    check_launchable(_rope_and_cache_kernel, device)


def rope_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``rope_and_cache_ref``. q, k and v may be strided views (e.g. slices of a fused
    QKV output) as long as head_dim is unit-stride. Positions must lie in cos_sin_cache and
    slots in the cache; both are the caller's bookkeeping and are not checked on the device."""
    _check_rope_inputs(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q_rot = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    k_rot = torch.empty((num_tokens, num_kv_heads, head_dim), dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_rot, k_rot
    block_h = triton.next_power_of_2(num_heads)
    block_half = triton.next_power_of_2(head_dim // 2)
    _rope_and_cache_kernel[(num_tokens,)](
        q,
        k,
        v,
        positions,
        cos_sin_cache,
        k_cache,
        v_cache,
        slot_mapping,
        q_rot,
        k_rot,
        num_heads,
        num_kv_heads,
        *q.stride()[:2],
        *k.stride()[:2],
        *v.stride()[:2],
        cos_sin_cache.stride(0),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        CACHE_BLOCK_SIZE=k_cache.shape[1],
        HALF_DIM=head_dim // 2,
        BLOCK_H=block_h,
        BLOCK_KV_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=block_half,
        # About 16 elements of q per thread.
        num_warps=min(8, max(1, block_h * block_half // 512)),
    )
    return q_rot, k_rot
