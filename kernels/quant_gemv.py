"""Batch-1 decode with quantized weights: y = (x W^T) * w_scale (+ b), W int8 or fp8 e4m3.

A batch-1 step reads every weight once, so one-byte weights halve its floor against bf16.
The kernel streams W's rows as they are stored, widens them in registers, accumulates in
float32 and applies the per-row scale once at the end. W8A8 (fp8) passes the token already
quantized with its scale; W8A16 (int8) passes it in its own 16/32-bit dtype.
"""

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check_launchable, check_tensor, require
from kernels.quant import FP8_DTYPE

QUANT_DTYPES = (torch.int8, FP8_DTYPE)
#: Rows per program and columns per load: 8 x 2048 one-byte weights = 16 KiB in flight per
#: program, the same bytes as the bf16 kernel's tile (kernels/gemv.py).
BLOCK_N = 8
BLOCK_K = 2048
NUM_WARPS = 8


def quant_gemv_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x (M, K) (fp8 with x_scale (M, 1), or float), qweight (N, K), w_scale (N,) -> (M, N)."""
    acc = x.float() @ qweight.float().t()
    if x_scale is not None:
        acc = acc * x_scale.float()
    acc = acc * w_scale.float()[None, :]
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype or x.dtype)


@triton.jit
def _quant_gemv_kernel(
    x_ptr: tl.tensor,
    w_ptr: tl.tensor,
    w_scale_ptr: tl.tensor,
    x_scale_ptr: tl.tensor,
    b_ptr: tl.tensor,
    y_ptr: tl.tensor,
    n: tl.tensor,
    k: tl.tensor,
    stride_w: tl.tensor,
    HAS_X_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
) -> None:
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        if EVEN_K:
            w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None], other=0.0)
            x = tl.load(x_ptr + cols)
        else:
            col_ok = cols < k
            w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :].to(tl.float32), axis=1)
    acc *= tl.load(w_scale_ptr + rows, mask=row_ok, other=0.0)
    if HAS_X_SCALE:
        acc *= tl.load(x_scale_ptr)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, acc.to(y_ptr.dtype.element_ty), mask=row_ok)


def quant_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Triton ``quant_gemv_ref`` for one row: x (1, K) -> (1, N)."""
    x_dtypes = (FP8_DTYPE,) if x_scale is not None else FLOAT_DTYPES
    check_tensor("x", x, ndim=2, dtypes=x_dtypes, device=x.device)
    check_tensor("qweight", qweight, ndim=2, dtypes=QUANT_DTYPES, device=x.device)
    num_out, width = qweight.shape
    require(x.shape == (1, width), "x must be (1, {}), got {}", width, tuple(x.shape))
    check_tensor("w_scale", w_scale, ndim=1, dtypes=(torch.float32,), device=x.device)
    require(w_scale.shape[0] == num_out, "w_scale must have {} entries", num_out)
    out_dtype = out_dtype or x.dtype
    require(out_dtype in FLOAT_DTYPES, "out_dtype must be a float dtype, got {}", out_dtype)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
        require(bias.shape[0] == num_out, "bias must have {} entries", num_out)
    check_launchable(_quant_gemv_kernel, x.device)
    y = torch.empty((1, num_out), dtype=out_dtype, device=x.device)
    block_k = min(BLOCK_K, triton.next_power_of_2(width))
    _quant_gemv_kernel[(triton.cdiv(num_out, BLOCK_N),)](
        x,
        qweight,
        w_scale,
        x_scale if x_scale is not None else w_scale,  # not read without HAS_X_SCALE
        bias if bias is not None else w_scale,  # not read without HAS_BIAS
        y,
        num_out,
        width,
        qweight.stride(0),
        HAS_X_SCALE=x_scale is not None,
        HAS_BIAS=bias is not None,
        EVEN_K=width % block_k == 0,
        BLOCK_N=BLOCK_N,
        BLOCK_K=block_k,
        num_warps=NUM_WARPS,
    )
    return y
