"""The one switch between torch references (CPU) and Triton kernels (CUDA).

Model code calls these functions; each picks the implementation from the tensor's device, so
switching devices never touches a model file. ``PDMESH_TORCH_OPS=1`` forces the references.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from kernels import activation, gemv, quant, rotary
from kernels import fused_moe as moe
from kernels import paged_attention as attn
from kernels import quant_gemm as qgemm
from kernels import rms_norm as norm
from kernels.quant_gemv import quant_gemv


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and os.environ.get("PDMESH_TORCH_OPS") != "1"


def _pick(x: torch.Tensor, module: Any, name: str) -> Callable[..., Any]:
    if _use_triton(x) and hasattr(module, name):
        return getattr(module, name)  # type: ignore[no-any-return]
    return getattr(module, f"{name}_ref")  # type: ignore[no-any-return]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b. One row (batch-1 decode) goes to the GEMV kernel, anything larger to cuBLAS."""
    if x.dim() == 2 and x.shape[0] == 1 and _use_triton(x):
        return gemv.gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """W8A16: (x W^T) * w_scale + b with int8 W (N, K) and float32 w_scale (N,)."""
    if _use_triton(x) and x.dim() == 2:
        if x.shape[0] == 1:
            return quant_gemv(x, qweight, w_scale, bias)
        return qgemm.quant_gemm(x, qweight, w_scale, bias)
    # CPU: widen W once per call and let the BLAS accumulate (float32 on the CPU).
    y = F.linear(x, qweight.to(x.dtype)) * w_scale.to(x.dtype)
    return y if bias is None else y + bias


def fp8_linear(
    x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """W8A8: x quantized to fp8 per token, then (xq W^T) * x_scale * w_scale + b."""
    if not (_use_triton(x) and x.dim() == 2):
        # CPU: fp8 values widen exactly to float32 and the BLAS accumulates in float32, the
        # product torch._scaled_mm computes (whose CPU version is about 30x slower).
        xq, x_scale = quant.per_token_fp8_ref(x.reshape(-1, x.shape[-1]))
        y = F.linear(xq.float(), qweight.float()) * x_scale * w_scale.view(1, -1)
        y = y if bias is None else y + bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], -1)
    xq, x_scale = quant.per_token_fp8(x)
    if x.shape[0] == 1:
        return quant_gemv(xq, qweight, w_scale, bias, x_scale, out_dtype=x.dtype)
    if qgemm.scaled_mm_fits(x, qweight, x.dtype):
        return qgemm.fp8_scaled_mm(xq, x_scale, qweight, w_scale, bias, x.dtype)
    return qgemm.quant_gemm(xq, qweight, w_scale, bias, x_scale, out_dtype=x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _pick(x, norm, "rms_norm")(x, weight, eps)  # type: ignore[no-any-return]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _pick(x, norm, "fused_add_rms_norm")(x, residual, weight, eps)  # type: ignore[no-any-return]


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return _pick(gate_up, activation, "silu_and_mul")(gate_up)  # type: ignore[no-any-return]


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return _pick(gate_up, activation, "gelu_tanh_and_mul")(gate_up)  # type: ignore[no-any-return]


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
    fn = _pick(q, rotary, "rope_and_cache")
    return fn(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)  # type: ignore[no-any-return]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    softcap: float | None = None,
) -> torch.Tensor:
    fn = _pick(q, attn, "paged_attention")
    return fn(  # type: ignore[no-any-return]
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, sliding_window, softcap
    )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    softcap: float | None = None,
) -> torch.Tensor:
    fn = _pick(q, attn, "paged_decode_attention")
    return fn(q, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window, softcap)  # type: ignore[no-any-return]


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    fn = _pick(hidden, moe, "fused_moe")
    return fn(hidden, w13, w2, topk_weights, topk_ids, activation)  # type: ignore[no-any-return]
