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

from kernels import activation, gemv, rotary
from kernels import fused_moe as moe
from kernels import paged_attention as attn
from kernels import rms_norm as norm


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
