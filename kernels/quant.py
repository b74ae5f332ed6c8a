"""Quantizers: weights to int8 / fp8 e4m3 with one scale per output channel (at load), and
activations to fp8 with one scale per token (every forward pass, W8A8).

A quantized tensor q with scale s stands for q * s. Per-row scales commute with splitting a
matrix by rows, and a column shard gets its own per-row scales, so every tensor-parallel rank
quantizes exactly the shard it holds.
"""

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check_launchable, check_tensor

INT8_MAX = 127.0
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
#: A row of zeros still gets a usable scale (its values quantize to 0 whatever it is).
MIN_SCALE = 1e-12


def _row_scales(w: torch.Tensor, limit: float) -> torch.Tensor:
    """(N, K) -> (N,) float32: each row's absolute maximum maps to ``limit``."""
    return (w.abs().amax(dim=-1).float() / limit).clamp_min(MIN_SCALE)


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (int8 (N, K), float32 scale (N,)), symmetric, round to nearest."""
    scale = _row_scales(w, INT8_MAX)
    q = torch.round(w.float() / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_fp8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (float8_e4m3fn (N, K), float32 scale (N,))."""
    scale = _row_scales(w, FP8_MAX)
    q = (w.float() / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 (N, K) values the quantized rows stand for."""
    return q.float() * scale.float()[:, None]


def per_token_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (float8_e4m3fn (M, K), float32 scale (M, 1)): dynamic, one scale per token."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp_min(MIN_SCALE)
    q = (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


# ---------------------------------------------------------------------------------------------
# Triton: one program per token row; a first pass finds the row's maximum, a second writes it.


@triton.jit
def _per_token_fp8_kernel(
    x_ptr: tl.tensor,
    q_ptr: tl.tensor,
    scale_ptr: tl.tensor,
    k: tl.tensor,
    stride_x: tl.tensor,
    FP8_MAX: tl.constexpr,
    MIN_SCALE: tl.constexpr,
    ROUND_IN_FP32: tl.constexpr,
    BLOCK_K: tl.constexpr,
) -> None:
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    peak = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + cols, mask=cols < k, other=0.0).to(tl.float32)
        peak = tl.maximum(peak, tl.abs(x))
    scale = tl.maximum(tl.max(peak, axis=0) / FP8_MAX, MIN_SCALE)
    tl.store(scale_ptr + row, scale)
    for start in range(0, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + cols, mask=cols < k, other=0.0).to(tl.float32)
        q = tl.clamp(x / scale, -FP8_MAX, FP8_MAX)
        if ROUND_IN_FP32:
            # The interpreter's float32 -> e4m3 cast drops the carry when rounding crosses a
            # power of two (127.9 -> 64): round to the e4m3 grid (3 mantissa bits, no finer
            # than the subnormal step 2^-9) first, so the cast is exact.
            exponent = tl.floor(tl.log2(tl.maximum(tl.abs(q), 2.0**-6)))
            step = tl.exp2(exponent - 3.0)
            q = tl.floor(q / step + 0.5) * step
        tl.store(q_ptr + row * k + cols, q.to(q_ptr.dtype.element_ty), mask=cols < k)


def per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``per_token_fp8_ref``: x (M, K) -> (fp8 (M, K) contiguous, float32 (M, 1))."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    check_launchable(_per_token_fp8_kernel, x.device)
    rows, width = x.shape
    q = torch.empty((rows, width), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        _per_token_fp8_kernel[(rows,)](
            x,
            q,
            scale,
            width,
            x.stride(0),
            FP8_MAX=FP8_MAX,
            MIN_SCALE=MIN_SCALE,
            ROUND_IN_FP32=x.device.type == "cpu",  # only the interpreter runs on the CPU
            BLOCK_K=min(2048, triton.next_power_of_2(width)),
            num_warps=4,
        )
    return q, scale
