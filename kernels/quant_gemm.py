"""Prefill (and batched decode) with quantized weights: y = (x W^T) * scales (+ b).

Two kinds share one tiled kernel:
- W8A16 (int8 weights): x stays in its dtype; each W tile is widened to it in registers
  right before the tensor-core dot, so only one-byte weights cross HBM.
- W8A8 (fp8 e4m3): x was quantized per token (``kernels.quant.per_token_fp8``); both tiles
  go to the fp8 tensor cores as they are.
Both accumulate in float32 and scale once per output element: acc * x_scale[m] * w_scale[n].
``fp8_scaled_mm`` is the same W8A8 product through ``torch._scaled_mm`` (cuBLASLt, row-wise
scales), which the engine uses where it is available and the bench measures against ours.
"""

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check_launchable, check_tensor, require
from kernels.quant import FP8_DTYPE
from kernels.quant_gemv import QUANT_DTYPES, quant_gemv_ref

#: Output tile columns and the reduction step; BLOCK_M follows the number of rows (a decode
#: batch of 64 does not pay for a 128-row tile).
BLOCK_N = 128
BLOCK_K = 64
NUM_STAGES = 4
NUM_WARPS = 4


def quant_gemm_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x (M, K) (fp8 with x_scale (M, 1), or float), qweight (N, K), w_scale (N,) -> (M, N)."""
    return quant_gemv_ref(x, qweight, w_scale, bias, x_scale, out_dtype)


@triton.jit(do_not_specialize=["m"])
def _quant_gemm_kernel(
    x_ptr: tl.tensor,
    w_ptr: tl.tensor,
    w_scale_ptr: tl.tensor,
    x_scale_ptr: tl.tensor,
    b_ptr: tl.tensor,
    y_ptr: tl.tensor,
    m: tl.tensor,
    n: tl.tensor,
    k: tl.tensor,
    stride_x: tl.tensor,
    stride_w: tl.tensor,
    stride_y: tl.tensor,
    HAS_X_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
) -> None:
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < m
    col_ok = cols < n
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x  # (BLOCK_M, 1)
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_w  # (1, BLOCK_N): W^T's columns
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < k
        a = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if not HAS_X_SCALE:  # weight-only: widened to the activations' dtype
            b = b.to(a.dtype)
        acc = tl.dot(a, b, acc)  # fp8 x fp8 goes to the tensor cores as it is
    acc *= tl.load(w_scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_X_SCALE:
        acc *= tl.load(x_scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rows.to(tl.int64)[:, None] * stride_y + cols[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _block_m(rows: int) -> int:
    return max(16, min(128, triton.next_power_of_2(rows)))


def quant_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Triton ``quant_gemm_ref``. fp8 x needs fp8 weights (W8A8); float x takes int8 or fp8
    weights (weight-only)."""
    x_dtypes = (FP8_DTYPE,) if x_scale is not None else FLOAT_DTYPES
    check_tensor("x", x, ndim=2, dtypes=x_dtypes, device=x.device)
    w_dtypes = (FP8_DTYPE,) if x_scale is not None else QUANT_DTYPES
    check_tensor("qweight", qweight, ndim=2, dtypes=w_dtypes, device=x.device)
    rows, width = x.shape
    num_out = qweight.shape[0]
    require(qweight.shape[1] == width, "qweight must be (N, {}), got {}", width, qweight.shape)
    check_tensor("w_scale", w_scale, ndim=1, dtypes=(torch.float32,), device=x.device)
    require(w_scale.shape[0] == num_out, "w_scale must have {} entries", num_out)
    if x_scale is not None:
        check_tensor("x_scale", x_scale, ndim=2, dtypes=(torch.float32,), device=x.device)
        require(x_scale.shape == (rows, 1), "x_scale must be ({}, 1)", rows)
        require(x_scale.is_contiguous(), "x_scale must be contiguous")
    out_dtype = out_dtype or x.dtype
    require(out_dtype in FLOAT_DTYPES, "out_dtype must be a float dtype, got {}", out_dtype)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
        require(bias.shape[0] == num_out, "bias must have {} entries", num_out)
    check_launchable(_quant_gemm_kernel, x.device)
    y = torch.empty((rows, num_out), dtype=out_dtype, device=x.device)
    block_m = _block_m(rows)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(num_out, BLOCK_N))
    _quant_gemm_kernel[grid](
        x,
        qweight,
        w_scale,
        x_scale if x_scale is not None else w_scale,
        bias if bias is not None else w_scale,
        y,
        rows,
        num_out,
        width,
        x.stride(0),
        qweight.stride(0),
        y.stride(0),
        HAS_X_SCALE=x_scale is not None,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        num_stages=NUM_STAGES,
        num_warps=NUM_WARPS,
    )
    return y


def scaled_mm_fits(x: torch.Tensor, qweight: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """cuBLASLt's fp8 GEMM with row-wise scales: CUDA, bf16 output, 16-aligned K and N."""
    return (
        x.is_cuda
        and out_dtype == torch.bfloat16
        and x.shape[1] % 16 == 0
        and qweight.shape[0] % 16 == 0
        and hasattr(torch, "_scaled_mm")
    )


def fp8_scaled_mm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The W8A8 product through ``torch._scaled_mm`` (W (N, K) row-major is W^T col-major)."""
    return torch._scaled_mm(
        xq,
        qweight.t(),
        scale_a=x_scale,
        scale_b=w_scale.view(1, -1),
        bias=bias.to(out_dtype) if bias is not None else None,
        out_dtype=out_dtype,
    )
