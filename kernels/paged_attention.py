"""Attention over a paged KV cache: variable-length query chunks (prefill, chunked prefill,
prefix continuation) and single-token decode, GQA-aware.

Layouts shared by every implementation:
- ``k_cache``, ``v_cache``: (num_blocks, block_size, num_kv_heads, head_dim)
- ``block_tables``: int32 (num_seqs, max_blocks_per_seq); unused entries hold 0
- ``seq_lens``: int32 (num_seqs,), context length per sequence *including* the new tokens
- ``cu_seqlens_q``: int32 (num_seqs + 1,), prefix sums of query lengths; the queries of a
  sequence are its last ``q_len`` positions, so query j sits at position seq_len - q_len + j
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_contiguous,
    check_launchable,
    check_tensor,
    num_sms,
    require,
)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's (length, kv_heads, head_dim) K or V, read through its block table."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:length]


def _window_mask(
    q_len: int, kv_len: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor:
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask  # (q_len, kv_len)


def softcapped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float,
) -> torch.Tensor:
    """Attention whose scores pass through softcap * tanh(score / softcap) before the softmax
    (Gemma 2); q (..., heads, M, D), k and v (..., kv_heads, N, D), mask broadcastable to
    (..., heads, M, N) or None."""
    group = q.shape[-3] // k.shape[-3]
    k = k.repeat_interleave(group, dim=-3)
    v = v.repeat_interleave(group, dim=-3)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q: (total_q, heads, head_dim) -> (total_q, heads, head_dim), causal within each sequence;
    ``softcap`` caps the scores with softcap * tanh(score / softcap) (None: no cap)."""
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for i, kv_len in enumerate(lens):
        q_start, q_end = cu[i], cu[i + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        k = gather_kv(k_cache, block_tables[i], kv_len).transpose(0, 1)  # (kv_heads, kv_len, D)
        v = gather_kv(v_cache, block_tables[i], kv_len).transpose(0, 1)
        qi = q[q_start:q_end].transpose(0, 1)  # (heads, q_len, D)
        needs_mask = sliding_window is not None and kv_len > sliding_window
        if softcap is not None:
            mask = _window_mask(q_len, kv_len, sliding_window, q.device)
            o = softcapped_attention(qi, k, v, mask, scale, softcap)
        elif q_len == 1 and not needs_mask:
            o = F.scaled_dot_product_attention(qi, k, v, scale=scale, enable_gqa=True)
        elif q_len == kv_len and not needs_mask:
            o = F.scaled_dot_product_attention(
                qi, k, v, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            mask = _window_mask(q_len, kv_len, sliding_window, q.device)
            o = F.scaled_dot_product_attention(
                qi, k, v, attn_mask=mask, scale=scale, enable_gqa=True
            )
        out[q_start:q_end] = o.transpose(0, 1)
    return out


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Batched single-token decode: q (num_seqs, heads, head_dim) -> same shape."""
    max_blocks = block_tables.shape[1]
    block_size = k_cache.shape[1]
    k = k_cache[block_tables.long()].flatten(1, 2)  # (num_seqs, max_blocks * block_size, KH, D)
    v = v_cache[block_tables.long()].flatten(1, 2)
    k_pos = torch.arange(max_blocks * block_size, device=q.device)[None, :]
    lens = seq_lens.to(q.device).long()[:, None]
    mask = k_pos < lens
    if sliding_window is not None:
        mask &= k_pos >= lens - sliding_window
    if softcap is not None:
        o = softcapped_attention(
            q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), mask[:, None, None, :],
            scale, softcap,
        )  # fmt: skip
        return o.squeeze(2)
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2),  # (num_seqs, heads, 1, D)
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )
    return o.squeeze(2)


# ---------------------------------------------------------------------------------------------
# Triton implementation.
#
# Both kernels walk a sequence's KV positions in tiles of BLOCK_N tokens, gathering each tile
# through the block table (BLOCK_N and the page size divide one another, so a tile is whole
# pages or part of one), and keep a flash-attention online softmax in float32: scores are
# scaled by scale * log2(e) inside the exponent so the exponentials are exp2, and no score
# matrix is ever materialized.

_LOG2E = 1.4426950408889634
# Finite "minus infinity" for the running max: a row whose first tiles are all masked keeps
# m = _NEG_BIG and exp2(-inf - _NEG_BIG) = 0, where -inf - -inf would give NaN.
_NEG_BIG = tl.constexpr(-1.0e30)
_MAX_SPLITS = 64
_MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension
# Integers that change from step to step (the batch's sequence count, the block table's
# width). Triton would otherwise compile a variant per value class (== 1, a multiple of 16,
# other) the first time each turns up, a stall of a second or more in the middle of serving.
_PER_STEP_PREFILL = ["num_seqs", "stride_bt"]


@dataclass(frozen=True)
class AttentionConfig:
    """Launch parameters. The public wrappers choose them; tests and benchmarks may pass their
    own to the ``launch_*`` functions."""

    block_m: int = 64  # query rows per program (prefill only)
    block_n: int = 64  # KV positions per inner-loop tile
    num_warps: int = 4
    num_stages: int = 2
    num_splits: int | None = None  # decode split-K partitions; None lets the wrapper choose


@triton.jit
def _kv_rows(
    block_table_ptr: tl.tensor,
    kv_pos: tl.tensor,
    valid: tl.tensor,
    stride_block: tl.tensor,
    stride_slot: tl.tensor,
    PAGE: tl.constexpr,
    MASKED: tl.constexpr,
) -> tl.tensor:
    """Cache offsets (int64, BLOCK_N) of KV positions kv_pos, looked up in the block table.
    K and V share them: the wrapper requires both caches to have the same strides."""
    if MASKED:
        page = tl.load(block_table_ptr + kv_pos // PAGE, mask=valid, other=0)
    else:
        page = tl.load(block_table_ptr + kv_pos // PAGE)
    return page.to(tl.int64) * stride_block + (kv_pos % PAGE) * stride_slot


@triton.jit
def _load_kv_tile(
    cache_ptr: tl.tensor,
    rows: tl.tensor,
    valid: tl.tensor,
    HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr,
) -> tl.tensor:
    """(BLOCK_N, HEAD_DIM) tile of one KV head. Masked lanes read zeros, so stale or NaN cache
    slots never reach the output (0 * NaN would)."""
    ptrs = cache_ptr + rows[:, None] + tl.arange(0, HEAD_DIM)[None, :]
    return tl.load(ptrs, mask=valid[:, None], other=0.0) if MASKED else tl.load(ptrs)


@triton.jit
def _online_softmax_step(
    scores: tl.tensor,
    qk_scale: tl.tensor,
    v: tl.tensor,
    acc: tl.tensor,
    m_i: tl.tensor,
    l_i: tl.tensor,
    DOT_PRECISION: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor, tl.tensor]:
    """Folds one tile of raw q.k scores (M, N), -inf where masked, and its values (N, D) into
    the running (acc, max, denominator), all in log2 units. Scaling inside the exponent's
    argument lets it compile to one FMA per score instead of a separate scaling pass."""
    m_new = tl.maximum(m_i, tl.max(scores, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _cap_scores(scores: tl.tensor, cap_scale: tl.tensor, softcap: tl.tensor) -> tl.tensor:
    """softcap * tanh(scale * score / softcap), tanh written with the sigmoid (exact at both
    ends: large |x| saturate to +-1 instead of overflowing)."""
    return softcap * (2.0 * tl.sigmoid(2.0 * scores * cap_scale) - 1.0)


@triton.jit
def _find_seq(
    cu_seqlens_q_ptr: tl.tensor, num_seqs: tl.tensor, q_tile: tl.tensor, BLOCK_M: tl.constexpr
) -> tl.tensor:
    """Sequence owning grid tile q_tile. Sequence s owns tiles from cu[s] // BLOCK_M + s
    through cu[s + 1] // BLOCK_M + s, at least ceil(q_len / BLOCK_M) of them, so the grid needs
    only total_q // BLOCK_M + num_seqs tiles and no host-side max; binary search the owner."""
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + (num_seqs - 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        owns_from = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_M + mid
        starts_before = owns_from <= q_tile
        lo = tl.where(starts_before, mid, lo)
        hi = tl.where(starts_before, hi, mid - 1)
    return lo


@triton.jit
def _prefill_kv_range(
    acc: tl.tensor,
    m_i: tl.tensor,
    l_i: tl.tensor,
    q: tl.tensor,
    k_ptr: tl.tensor,
    v_ptr: tl.tensor,
    block_table_ptr: tl.tensor,
    lo: tl.tensor,
    hi: tl.tensor,
    q_pos: tl.tensor,
    window: tl.tensor,
    qk_scale: tl.tensor,
    cap_scale: tl.tensor,
    softcap: tl.tensor,
    stride_block: tl.tensor,
    stride_slot: tl.tensor,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    SLIDING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor, tl.tensor]:
    """Attends the query tile to KV positions [lo, hi). MASKED=False is the fast path for
    tiles every query row sees completely (no causal or window edge inside them)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        kv_pos = start + offs_n
        valid = kv_pos < hi
        rows = _kv_rows(block_table_ptr, kv_pos, valid, stride_block, stride_slot, PAGE, MASKED)
        k = _load_kv_tile(k_ptr, rows, valid, HEAD_DIM, MASKED)  # (BLOCK_N, HEAD_DIM)
        v = _load_kv_tile(v_ptr, rows, valid, HEAD_DIM, MASKED)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (M, N)
        if SOFTCAP:  # before masking: tanh would turn -inf into -softcap
            scores = _cap_scores(scores, cap_scale, softcap)
        if MASKED:
            visible = valid[None, :] & (kv_pos[None, :] <= q_pos[:, None])
            if SLIDING:
                visible = visible & (kv_pos[None, :] > q_pos[:, None] - window)
            scores = tl.where(visible, scores, float("-inf"))
        acc, m_i, l_i = _online_softmax_step(scores, qk_scale, v, acc, m_i, l_i, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=_PER_STEP_PREFILL)
def _prefill_kernel(
    q_ptr: tl.tensor,
    k_cache_ptr: tl.tensor,
    v_cache_ptr: tl.tensor,
    out_ptr: tl.tensor,
    block_tables_ptr: tl.tensor,
    cu_seqlens_q_ptr: tl.tensor,
    seq_lens_ptr: tl.tensor,
    num_seqs: tl.tensor,
    qk_scale: tl.tensor,
    cap_scale: tl.tensor,
    softcap: tl.tensor,
    window: tl.tensor,
    stride_q_t: tl.tensor,
    stride_q_h: tl.tensor,
    stride_o_t: tl.tensor,
    stride_o_h: tl.tensor,
    stride_bt: tl.tensor,
    stride_block: tl.tensor,
    stride_slot: tl.tensor,
    stride_head: tl.tensor,
    GROUP: tl.constexpr,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SLIDING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
) -> None:
    """Grid (num_heads, total_q // BLOCK_M + num_seqs): one BLOCK_M tile of one query head.
    Tiles run last to first, so the causal tiles with the most keys start first and the short
    ones fill the tail of the launch; the heads of one tile run side by side and share its KV
    pages in L2."""
    head = tl.program_id(0)
    q_tile = tl.num_programs(1) - 1 - tl.program_id(1)
    seq = _find_seq(cu_seqlens_q_ptr, num_seqs, q_tile, BLOCK_M)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    first_row = (q_tile - (q_start // BLOCK_M + seq)) * BLOCK_M  # within the sequence
    if first_row >= q_len:  # spare tile of the over-provisioned grid
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    rows = first_row + tl.arange(0, BLOCK_M)
    row_valid = rows < q_len
    q_pos = seq_len - q_len + rows  # the queries are the sequence's last q_len positions
    offs_d = tl.arange(0, HEAD_DIM)
    q_offs = (q_start + rows).to(tl.int64)[:, None] * stride_q_t + head * stride_q_h
    q = tl.load(q_ptr + q_offs + offs_d[None, :], mask=row_valid[:, None], other=0.0)

    kv_head_offset = (head // GROUP) * stride_head
    k_ptr = k_cache_ptr + kv_head_offset
    v_ptr = v_cache_ptr + kv_head_offset
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    # KV positions split into [lo, full_lo) window edge (masked), [full_lo, full_hi) seen by
    # every row (unmasked) and [full_hi, hi) causal diagonal (masked); each a multiple of
    # BLOCK_N apart except hi.
    first_pos = seq_len - q_len + first_row
    hi = first_pos + tl.minimum(BLOCK_M, q_len - first_row)  # one past the last row's position
    full_hi = (first_pos + 1) // BLOCK_N * BLOCK_N
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if SLIDING:
        lo = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N
        # Keys at or after hi - window are inside the window of every row, even the last.
        full_lo = tl.cdiv(tl.maximum(hi - window, 0), BLOCK_N) * BLOCK_N
        full_lo = tl.minimum(tl.maximum(full_lo, lo), full_hi)
        acc, m_i, l_i = _prefill_kv_range(
            acc, m_i, l_i, q, k_ptr, v_ptr, block_table_ptr, lo, full_lo, q_pos, window,
            qk_scale, cap_scale, softcap, stride_block, stride_slot, PAGE, HEAD_DIM, BLOCK_N,
            MASKED=True, SLIDING=SLIDING, SOFTCAP=SOFTCAP, DOT_PRECISION=DOT_PRECISION,
        )  # fmt: skip
    else:
        full_lo = 0
    acc, m_i, l_i = _prefill_kv_range(
        acc, m_i, l_i, q, k_ptr, v_ptr, block_table_ptr, full_lo, full_hi, q_pos, window,
        qk_scale, cap_scale, softcap, stride_block, stride_slot, PAGE, HEAD_DIM, BLOCK_N,
        MASKED=False, SLIDING=SLIDING, SOFTCAP=SOFTCAP, DOT_PRECISION=DOT_PRECISION,
    )  # fmt: skip
    acc, m_i, l_i = _prefill_kv_range(
        acc, m_i, l_i, q, k_ptr, v_ptr, block_table_ptr, full_hi, hi, q_pos, window,
        qk_scale, cap_scale, softcap, stride_block, stride_slot, PAGE, HEAD_DIM, BLOCK_N,
        MASKED=True, SLIDING=SLIDING, SOFTCAP=SOFTCAP, DOT_PRECISION=DOT_PRECISION,
    )  # fmt: skip

    # Every valid row sees at least its own key (l_i > 0); padding rows may see none.
    out = acc / tl.where(row_valid, l_i, 1.0)[:, None]
    o_offs = (q_start + rows).to(tl.int64)[:, None] * stride_o_t + head * stride_o_h
    tl.store(
        out_ptr + o_offs + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None],
    )


@triton.jit(do_not_specialize=["stride_bt"])
def _decode_kernel(
    q_ptr: tl.tensor,
    k_cache_ptr: tl.tensor,
    v_cache_ptr: tl.tensor,
    out_ptr: tl.tensor,
    part_out_ptr: tl.tensor,
    part_lse_ptr: tl.tensor,
    block_tables_ptr: tl.tensor,
    seq_lens_ptr: tl.tensor,
    num_heads: tl.tensor,
    qk_scale: tl.tensor,
    cap_scale: tl.tensor,
    softcap: tl.tensor,
    window: tl.tensor,
    stride_q_s: tl.tensor,
    stride_q_h: tl.tensor,
    stride_o_s: tl.tensor,
    stride_o_h: tl.tensor,
    stride_bt: tl.tensor,
    stride_block: tl.tensor,
    stride_slot: tl.tensor,
    stride_head: tl.tensor,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SLIDING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
) -> None:
    """Grid (num_seqs, num_kv_heads, NUM_SPLITS). A program reads its KV head's pages once for
    all GROUP query heads that share them (GQA), stacked as the rows of one tl.dot operand
    padded to GROUP_PAD >= 16. With NUM_SPLITS > 1 it covers one slice of the context and
    writes a partial result for _decode_reduce_kernel."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_lo = tl.maximum(seq_len - window, 0) if SLIDING else 0
    # Split the visible context evenly, in whole tiles, starting from a tile boundary.
    base = ctx_lo // BLOCK_N * BLOCK_N
    per_split = tl.cdiv(tl.cdiv(seq_len - base, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = base + split * per_split
    end = tl.minimum(start + per_split, seq_len)

    group_rows = tl.arange(0, GROUP_PAD)
    row_valid = group_rows < GROUP
    heads = kv_head * GROUP + group_rows
    offs_d = tl.arange(0, HEAD_DIM)
    q_offs = seq.to(tl.int64) * stride_q_s + heads[:, None] * stride_q_h + offs_d[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_valid[:, None], other=0.0)  # (GROUP_PAD, D)

    k_ptr = k_cache_ptr + kv_head * stride_head
    v_ptr = v_cache_ptr + kv_head * stride_head
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([GROUP_PAD], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for tile in range(start, end, BLOCK_N):
        kv_pos = tile + offs_n
        valid = (kv_pos < end) & (kv_pos >= ctx_lo)
        rows = _kv_rows(
            block_table_ptr, kv_pos, valid, stride_block, stride_slot, PAGE, MASKED=True
        )
        k = _load_kv_tile(k_ptr, rows, valid, HEAD_DIM, MASKED=True)  # (BLOCK_N, HEAD_DIM)
        v = _load_kv_tile(v_ptr, rows, valid, HEAD_DIM, MASKED=True)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (GROUP_PAD, BLOCK_N)
        if SOFTCAP:
            scores = _cap_scores(scores, cap_scale, softcap)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        acc, m_i, l_i = _online_softmax_step(scores, qk_scale, v, acc, m_i, l_i, DOT_PRECISION)

    # An empty slice (short sequence, or seq_len == 0 padding) has l_i == 0: write zeros.
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        o_offs = seq.to(tl.int64) * stride_o_s + heads[:, None] * stride_o_h + offs_d[None, :]
        tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
    else:
        # Partials are (num_seqs, num_heads, NUM_SPLITS[, HEAD_DIM]) float32; the log-sum-exp
        # stays in log2 units, like the scores.
        part_row = (seq.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part_row, lse, mask=row_valid)
        part_offs = part_row[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(part_out_ptr + part_offs, out, mask=row_valid[:, None])


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr: tl.tensor,
    part_lse_ptr: tl.tensor,
    out_ptr: tl.tensor,
    num_heads: tl.tensor,
    stride_o_s: tl.tensor,
    stride_o_h: tl.tensor,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
) -> None:
    """Grid (num_seqs, num_heads): merges the per-split normalized outputs, each weighted by
    its share exp2(lse_i - max lse) of the softmax denominator."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_valid = splits < NUM_SPLITS
    part_row = (seq * num_heads + head) * NUM_SPLITS + splits
    lse = tl.load(part_lse_ptr + part_row, mask=split_valid, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # every split empty
    weight = tl.exp2(lse - lse_max)  # empty splits: exp2(-inf) = 0
    offs_d = tl.arange(0, HEAD_DIM)
    parts = tl.load(
        part_out_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :],
        mask=split_valid[:, None],
        other=0.0,
    )  # (SPLITS_PAD, HEAD_DIM)
    total = tl.sum(weight, 0)
    out = tl.sum(parts * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    o_offs = seq * stride_o_s + head * stride_o_h + offs_d
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------
# Wrappers: validation and launch parameters.


def _check_cache_and_tables(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    sliding_window: int | None,
) -> None:
    """Checks shared by prefill and decode; q is (tokens or seqs, heads, head_dim)."""
    device = q.device
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, device=device)
    num_heads, head_dim = q.shape[1:]
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        # tl.dot needs both operands in one dtype, so the cache must match q.
        check_tensor(name, cache, ndim=4, dtypes=(q.dtype,), device=device)
    require(k_cache.shape == v_cache.shape, "k_cache and v_cache shapes differ")
    require(k_cache.stride() == v_cache.stride(), "k_cache and v_cache strides differ")
    num_kv_heads = k_cache.shape[2]
    require(
        k_cache.shape[3] == head_dim,
        "cache head_dim {} != q head_dim {}",
        k_cache.shape[3],
        head_dim,
    )
    require(
        head_dim in (16, 32, 64, 128, 256),
        "head_dim must be a power of two in [16, 256], got {}",
        head_dim,
    )
    require(
        num_kv_heads > 0 and num_heads % num_kv_heads == 0,
        "num_heads {} must be a multiple of num_kv_heads {}",
        num_heads,
        num_kv_heads,
    )
    check_tensor("block_tables", block_tables, ndim=2, dtypes=INDEX_DTYPES, device=device)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES, device=device)
    check_contiguous("seq_lens", seq_lens)
    require(
        block_tables.shape[0] == seq_lens.shape[0],
        "block_tables has {} rows, seq_lens {}",
        block_tables.shape[0],
        seq_lens.shape[0],
    )
    require(
        sliding_window is None or sliding_window >= 1,
        "sliding_window must be None or >= 1, got {}",
        sliding_window,
    )


def _check_config(config: AttentionConfig, page_size: int) -> None:
    for name in ("block_m", "block_n"):
        value = getattr(config, name)
        require(value >= 16 and value & (value - 1) == 0, "{} must be a power of 2 >= 16", name)
    require(
        config.block_n % page_size == 0 or page_size % config.block_n == 0,
        "block_n {} and page size {} must divide one another",
        config.block_n,
        page_size,
    )
    require(
        config.num_splits is None or 1 <= config.num_splits <= _MAX_SPLITS,
        "num_splits must be in [1, {}]",
        _MAX_SPLITS,
    )


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs would default to TF32 on the GPU; keep them exact.
    return "ieee" if dtype == torch.float32 else "tf32"


def _window_arg(sliding_window: int | None) -> int:
    return sliding_window if sliding_window is not None else 0


def _score_args(scale: float, softcap: float | None) -> tuple[float, float, float]:
    """(qk_scale, cap_scale, softcap) kernel arguments. Uncapped, the scale folds into the
    exponent; capped, the kernel scales inside the tanh and the exponent only converts to
    log2 units."""
    if softcap is None:
        return scale * _LOG2E, 0.0, 0.0
    require(softcap > 0, "softcap must be positive, got {}", softcap)
    return _LOG2E, scale / softcap, softcap


def _prefill_config(head_dim: int, page_size: int) -> AttentionConfig:
    # 64 x 64 tiles, one warpgroup, 2 stages measured best on H100 at head_dim 128 among 36
    # configs; the KV tile spans whole pages.
    block_n = max(64, page_size) if head_dim <= 128 else max(32, page_size)
    return AttentionConfig(block_m=64, block_n=block_n, num_warps=4, num_stages=2)


def launch_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    config: AttentionConfig,
    softcap: float | None = None,
) -> torch.Tensor:
    """``paged_attention`` with explicit launch parameters."""
    _check_cache_and_tables(q, k_cache, v_cache, block_tables, seq_lens, sliding_window)
    check_tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=INDEX_DTYPES, device=q.device)
    check_contiguous("cu_seqlens_q", cu_seqlens_q)
    num_seqs = seq_lens.shape[0]
    require(
        cu_seqlens_q.shape[0] == num_seqs + 1,
        "cu_seqlens_q has {} entries, expected num_seqs + 1 = {}",
        cu_seqlens_q.shape[0],
        num_seqs + 1,
    )
    _check_config(config, k_cache.shape[1])
    check_launchable(_prefill_kernel, q.device)
    total_q, num_heads, head_dim = q.shape
    out = torch.empty((total_q, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if total_q == 0 or num_seqs == 0:
        return out
    grid = (num_heads, total_q // config.block_m + num_seqs)
    require(grid[1] <= _MAX_GRID_Y, "too many query tiles ({}) for one launch", grid[1])
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        cu_seqlens_q,
        seq_lens,
        num_seqs,
        *_score_args(scale, softcap),
        _window_arg(sliding_window),
        *q.stride()[:2],
        *out.stride()[:2],
        block_tables.stride(0),
        *k_cache.stride()[:3],
        GROUP=num_heads // k_cache.shape[2],
        PAGE=k_cache.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        SLIDING=sliding_window is not None,
        SOFTCAP=softcap is not None,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Triton ``paged_attention_ref``: causal attention of variable-length query chunks over
    the paged cache, all sequences in one launch, no host synchronization. q may be a strided
    view (unit-stride head_dim). seq_lens, cu_seqlens_q and block_tables must be consistent
    (q_len <= seq_len <= pages * block_size); that is the caller's bookkeeping."""
    config = _prefill_config(q.shape[-1], k_cache.shape[1])
    return launch_paged_attention(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, sliding_window, config,
        softcap,
    )  # fmt: skip


def decode_num_splits(
    num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device
) -> int:
    """Split-K partitions for decode. A (seq, kv head) program streams its whole context, so
    a batch with fewer programs than SMs leaves SMs idle; split the context until about two
    programs per SM, keeping at least _MIN_SPLIT_TOKENS keys per split so the extra reduce
    pass stays cheap. On H100 (8 KV heads, contexts 2k-32k, batch 1-16) this lands within
    about 5% of the best split count measured; batch 32 and up runs fastest unsplit."""
    programs = num_seqs * num_kv_heads
    sms = num_sms(device)
    if programs >= sms:
        return 1
    by_occupancy = triton.cdiv(2 * sms, max(programs, 1))
    by_length = max(1, max_context // _MIN_SPLIT_TOKENS)
    return max(1, min(by_occupancy, by_length, _MAX_SPLITS))


_MIN_SPLIT_TOKENS = 128


def _decode_config(head_dim: int, page_size: int) -> AttentionConfig:
    # Decode is bandwidth bound: 64-token K and V tiles (4 pages of 16) with 4 stages of
    # loads in flight measured best on H100 (within 3% of the best of 90 configs at batch
    # 32-64, context 4k-8k).
    block_n = max(64 if head_dim <= 128 else 32, page_size)
    return AttentionConfig(block_m=16, block_n=block_n, num_warps=4, num_stages=4)


def launch_paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    config: AttentionConfig,
    softcap: float | None = None,
) -> torch.Tensor:
    """``paged_decode_attention`` with explicit launch parameters; config.num_splits = None
    picks the split count with ``decode_num_splits``."""
    _check_cache_and_tables(q, k_cache, v_cache, block_tables, seq_lens, sliding_window)
    num_seqs, num_heads, head_dim = q.shape
    require(
        seq_lens.shape[0] == num_seqs,
        "seq_lens has {} entries, q has {} sequences",
        seq_lens.shape[0],
        num_seqs,
    )
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    _check_config(config, page_size)
    check_launchable(_decode_kernel, q.device)
    out = torch.empty((num_seqs, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    num_splits = config.num_splits
    if num_splits is None:
        # Upper bound on any context without a device sync: the block table's width.
        max_context = block_tables.shape[1] * page_size
        if sliding_window is not None:
            max_context = min(max_context, sliding_window + config.block_n)
        num_splits = decode_num_splits(num_seqs, num_kv_heads, max_context, q.device)
    group = num_heads // num_kv_heads
    if num_splits > 1:
        part_out = torch.empty(
            (num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )
        part_lse = torch.empty(
            (num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device
        )
    else:
        part_out = part_lse = out  # unused: the kernel writes the final output directly
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        out,
        part_out,
        part_lse,
        block_tables,
        seq_lens,
        num_heads,
        *_score_args(scale, softcap),
        _window_arg(sliding_window),
        *q.stride()[:2],
        *out.stride()[:2],
        block_tables.stride(0),
        *k_cache.stride()[:3],
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),  # tl.dot needs M >= 16
        PAGE=page_size,
        HEAD_DIM=head_dim,
        BLOCK_N=config.block_n,
        NUM_SPLITS=num_splits,
        SLIDING=sliding_window is not None,
        SOFTCAP=softcap is not None,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            part_out,
            part_lse,
            out,
            num_heads,
            *out.stride()[:2],
            HEAD_DIM=head_dim,
            NUM_SPLITS=num_splits,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            num_warps=4,
        )
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Triton ``paged_decode_attention_ref``: one query token per sequence, GQA-aware, with a
    split-K (flash-decoding) path when the batch alone cannot fill the GPU. A sequence with
    seq_len == 0 (batch padding) gets zeros. No host synchronization."""
    config = _decode_config(q.shape[-1], k_cache.shape[1])
    return launch_paged_decode_attention(
        q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, config, softcap
    )
