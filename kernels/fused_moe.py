"""Fused mixture-of-experts MLP: every (token, chosen expert) pair runs that expert's gated
MLP and the results come back weighted by the router.

Shapes shared by every implementation:
- ``hidden``: (T, H) tokens; ``topk_ids``, ``topk_weights``: (T, K) chosen experts and their
  routing weights. Ids outside [0, E) belong to experts held by other ranks (expert
  parallelism) and contribute nothing here.
- ``w13``: (E, 2 * I, H), each expert's gate rows then up rows; ``w2``: (E, H, I).

The Triton path sorts the T * K pairs by expert into blocks of BLOCK_M rows, each block one
expert's (padded with an out-of-range pair id), then runs two grouped GEMMs over the blocks:
gate-up with the activation fused, and down with the routing weight fused. A block that no
pair fills exits at once, so a decode step reads only the chosen experts' weights. Nothing
syncs with the host: the grid is sized for the worst case, so CUDA graphs capture it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, INDEX_DTYPES, check_launchable, check_tensor, require

_SQRT_2_OVER_PI = 0.7978845608028654


def _activation(gate: torch.Tensor, activation: str) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh") if activation == "gelu_tanh" else F.silu(gate)


def fused_moe_ref(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """A per-expert loop (what Hugging Face runs): (T, H) -> (T, H)."""
    out = torch.zeros_like(hidden)
    for expert in range(w13.shape[0]):
        token, slot = torch.where(topk_ids == expert)
        if token.numel() == 0:
            continue
        gate, up = F.linear(hidden[token], w13[expert]).chunk(2, dim=-1)
        y = F.linear(_activation(gate, activation) * up, w2[expert])
        out.index_add_(0, token, (y * topk_weights[token, slot, None]).to(out.dtype))
    return out


@dataclass(frozen=True)
class ExpertBlocks:
    """The T * K (token, slot) pairs grouped by expert in blocks of ``block_m`` rows."""

    #: (max_rows,) int32 pair id (token * K + slot) of each row; num_pairs marks padding.
    sorted_pairs: torch.Tensor
    #: (max_rows // block_m,) int32 expert of each block; num_experts marks an unused block.
    block_experts: torch.Tensor


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """Sorts pairs by expert, each expert's rows padded to a multiple of ``block_m``; pairs of
    experts outside [0, num_experts) are left out. Fixed-size outputs, no host sync."""
    flat = topk_ids.flatten().long()
    num_pairs, device = flat.numel(), flat.device
    local = (flat >= 0) & (flat < num_experts)
    bucket = torch.where(local, flat, num_experts)  # num_experts: dropped
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    padded_ends = padded.cumsum(0)
    padded_starts = torch.cat([padded_ends.new_zeros(1), padded_ends])  # (E + 1,)
    count_starts = counts.cumsum(0) - counts
    order = torch.sort(bucket, stable=True).indices  # pair ids grouped by expert
    sorted_bucket = bucket[order]
    rank_in_expert = torch.arange(num_pairs, device=device) - count_starts[sorted_bucket]
    max_rows = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    dest = torch.where(
        sorted_bucket < num_experts, padded_starts[sorted_bucket] + rank_in_expert, max_rows
    )
    sorted_pairs = torch.full((max_rows + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, dest, order.to(torch.int32))  # slot max_rows takes the dropped
    block_starts = torch.arange(0, max_rows, block_m, device=device)
    block_experts = torch.searchsorted(padded_ends, block_starts, right=True).to(torch.int32)
    return ExpertBlocks(sorted_pairs[:max_rows], block_experts)


# ---------------------------------------------------------------------------------------------
# Triton implementation: two grouped GEMMs over the expert blocks, grid (blocks, N tiles).


@triton.jit
def _block_rows(
    sorted_pairs_ptr: tl.tensor, block_experts_ptr: tl.tensor, num_experts: tl.tensor,
    num_pairs: tl.tensor, BLOCK_M: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor, tl.tensor]:  # fmt: skip
    """(expert, pair ids, row mask) of this program's block; expert == num_experts: unused."""
    block = tl.program_id(0)
    expert = tl.load(block_experts_ptr + block)
    pairs = tl.load(sorted_pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    return expert, pairs, pairs < num_pairs


@triton.jit(do_not_specialize=["num_pairs"])
def _gate_up_kernel(
    x_ptr: tl.tensor,
    w13_ptr: tl.tensor,
    out_ptr: tl.tensor,
    sorted_pairs_ptr: tl.tensor,
    block_experts_ptr: tl.tensor,
    num_experts: tl.tensor,
    num_pairs: tl.tensor,
    hidden: tl.tensor,
    intermediate: tl.tensor,
    stride_x: tl.tensor,
    stride_we: tl.tensor,
    stride_wn: tl.tensor,
    stride_out: tl.tensor,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GELU: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
) -> None:
    """out[pair, n] = act(x[token] . gate_e[n]) * (x[token] . up_e[n]) for one block of rows
    (one expert) and BLOCK_N intermediate columns."""
    expert, pairs, row_valid = _block_rows(
        sorted_pairs_ptr, block_experts_ptr, num_experts, num_pairs, BLOCK_M
    )
    if expert >= num_experts:
        return
    tokens = (pairs // TOP_K).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < intermediate
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_x + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
    w_base = w13_ptr + expert.to(tl.int64) * stride_we
    gate_ptrs = w_base + cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # (K, N)
    up_ptrs = gate_ptrs + intermediate.to(tl.int64) * stride_wn
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_valid = (k0 + offs_k) < hidden
        x = tl.load(x_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        w_mask = k_valid[:, None] & col_valid[None, :]
        gate_w = tl.load(gate_ptrs, mask=w_mask, other=0.0)
        up_w = tl.load(up_ptrs, mask=w_mask, other=0.0)
        acc_gate = tl.dot(x, gate_w, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(x, up_w, acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    # Round as the reference does: projections, then the activation, to the output dtype.
    dtype = out_ptr.dtype.element_ty
    gate = acc_gate.to(dtype).to(tl.float32)
    up = acc_up.to(dtype).to(tl.float32)
    if GELU:
        act = gate * tl.sigmoid(2.0 * _SQRT_2_OVER_PI * (gate + 0.044715 * gate * gate * gate))
    else:
        act = gate * tl.sigmoid(gate)
    act = act.to(dtype).to(tl.float32)
    out_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_out + cols[None, :]
    tl.store(out_ptrs, (act * up).to(dtype), mask=row_valid[:, None] & col_valid[None, :])


@triton.jit(do_not_specialize=["num_pairs"])
def _down_kernel(
    act_ptr: tl.tensor,
    w2_ptr: tl.tensor,
    weights_ptr: tl.tensor,
    out_ptr: tl.tensor,
    sorted_pairs_ptr: tl.tensor,
    block_experts_ptr: tl.tensor,
    num_experts: tl.tensor,
    num_pairs: tl.tensor,
    hidden: tl.tensor,
    intermediate: tl.tensor,
    stride_act: tl.tensor,
    stride_we: tl.tensor,
    stride_wn: tl.tensor,
    stride_out: tl.tensor,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
) -> None:
    """out[pair, n] = weight[pair] * (act[pair] . down_e[n]) for one block and BLOCK_N hidden
    columns; the caller sums each token's K rows."""
    expert, pairs, row_valid = _block_rows(
        sorted_pairs_ptr, block_experts_ptr, num_experts, num_pairs, BLOCK_M
    )
    if expert >= num_experts:
        return
    pair_rows = pairs.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < hidden
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + pair_rows[:, None] * stride_act + offs_k[None, :]
    w_ptrs = (
        w2_ptr + expert.to(tl.int64) * stride_we
        + cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    )  # fmt: skip
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, intermediate, BLOCK_K):
        k_valid = (k0 + offs_k) < intermediate
        a = tl.load(a_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_valid[:, None] & col_valid[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    dtype = out_ptr.dtype.element_ty
    weight = tl.load(weights_ptr + pairs, mask=row_valid, other=0.0).to(tl.float32)
    y = acc.to(dtype).to(tl.float32) * weight[:, None]
    out_ptrs = out_ptr + pair_rows[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, y.to(dtype), mask=row_valid[:, None] & col_valid[None, :])


# ---------------------------------------------------------------------------------------------
# Wrapper: validation and launch parameters.


@dataclass(frozen=True)
class MoELaunchConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            require(value >= 16 and value & (value - 1) == 0, "{} must be a power of 2 >= 16", name)


def default_moe_config(num_pairs: int, intermediate: int) -> MoELaunchConfig:
    """Decode (few pairs per expert) wants short blocks so padding costs little and many
    column tiles so the weight stream fills the device (narrower ones for small experts,
    e.g. Qwen3-30B-A3B's 768); prefill wants square tiles. Not tuned on a GPU yet."""
    if num_pairs <= 64:
        block_n = 32 if intermediate <= 2048 else 64
        return MoELaunchConfig(block_m=16, block_n=block_n, block_k=128, num_stages=4)
    if num_pairs <= 1024:
        return MoELaunchConfig(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=4)
    return MoELaunchConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> None:
    device = hidden.device
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    check_tensor("w13", w13, ndim=3, dtypes=(hidden.dtype,), device=device)
    check_tensor("w2", w2, ndim=3, dtypes=(hidden.dtype,), device=device)
    check_tensor("topk_ids", topk_ids, ndim=2, dtypes=INDEX_DTYPES, device=device)
    check_tensor("topk_weights", topk_weights, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    num_experts, two_i, size = w13.shape
    require(size == hidden.shape[1], "w13 hidden size {} != {}", size, hidden.shape[1])
    require(two_i % 2 == 0, "w13 must stack gate and up rows, got {} rows", two_i)
    require(
        tuple(w2.shape) == (num_experts, size, two_i // 2),
        "w2 shape {} != (E, H, I) = {}",
        tuple(w2.shape),
        (num_experts, size, two_i // 2),
    )
    require(topk_ids.shape == topk_weights.shape, "topk_ids and topk_weights shapes differ")
    require(topk_ids.shape[0] == hidden.shape[0], "topk_ids rows != tokens")
    for name, t in (("hidden", hidden), ("w13", w13), ("w2", w2)):
        require(t.stride(-1) == 1, "{} must have unit stride in its last dim", name)


def launch_fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
    config: MoELaunchConfig,
) -> torch.Tensor:
    """``fused_moe`` with explicit launch parameters."""
    _check(hidden, w13, w2, topk_weights, topk_ids)
    require(activation in ("silu", "gelu_tanh"), "unknown activation {!r}", activation)
    check_launchable(_gate_up_kernel, hidden.device)
    num_tokens, size = hidden.shape
    num_experts, intermediate, top_k = w13.shape[0], w13.shape[1] // 2, topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    blocks = align_by_expert(topk_ids, num_experts, config.block_m)
    num_blocks = blocks.block_experts.shape[0]
    act = torch.empty((num_pairs, intermediate), dtype=hidden.dtype, device=hidden.device)
    # Pairs of other ranks' experts are never written: they must read as zero in the sum.
    out = torch.zeros((num_pairs, size), dtype=hidden.dtype, device=hidden.device)
    if num_pairs == 0:
        return out.view(num_tokens, top_k, size).sum(1)
    weights = topk_weights.contiguous()
    precision = _dot_precision(hidden.dtype)
    launch = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    tiles = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k)
    _gate_up_kernel[(num_blocks, triton.cdiv(intermediate, config.block_n))](
        hidden, w13, act, blocks.sorted_pairs, blocks.block_experts, num_experts, num_pairs,
        size, intermediate, hidden.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        TOP_K=top_k, GELU=activation == "gelu_tanh", DOT_PRECISION=precision, **tiles, **launch,
    )  # fmt: skip
    _down_kernel[(num_blocks, triton.cdiv(size, config.block_n))](
        act, w2, weights, out, blocks.sorted_pairs, blocks.block_experts, num_experts,
        num_pairs, size, intermediate, act.stride(0), w2.stride(0), w2.stride(1),
        out.stride(0), DOT_PRECISION=precision, **tiles, **launch,
    )  # fmt: skip
    return out.view(num_tokens, top_k, size).sum(1)


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """Triton ``fused_moe_ref``: (T, H) -> (T, H), no host synchronization."""
    config = default_moe_config(topk_ids.numel(), w13.shape[1] // 2)
    return launch_fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation, config)
