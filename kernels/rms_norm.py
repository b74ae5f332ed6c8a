"""RMSNorm and fused residual-add + RMSNorm (Llama semantics: statistics in float32)."""

import torch
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check_launchable, check_tensor, require


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * (x / rms(x)); x: (T, hidden)."""
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    # Cast back before the weight multiply, as Hugging Face's LlamaRMSNorm does.
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual)."""
    summed = x + residual
    return rms_norm_ref(summed, weight, eps), summed


# ---------------------------------------------------------------------------------------------
# Triton implementation: one program normalizes one row held entirely in registers.

# A row longer than this would spill registers; no supported model comes close.
_MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_kernel(
    x_ptr: tl.tensor,
    residual_ptr: tl.tensor,
    weight_ptr: tl.tensor,
    out_ptr: tl.tensor,
    summed_ptr: tl.tensor,
    stride_x: tl.tensor,
    stride_residual: tl.tensor,
    stride_out: tl.tensor,
    stride_summed: tl.tensor,
    hidden: tl.tensor,
    eps: tl.tensor,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
) -> None:
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        # The reference rounds the sum to the activation dtype before taking statistics.
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(summed_ptr + row * stride_summed + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
    # Round the normalized row to the input dtype before the weight multiply (HF semantics).
    normed = (x32 * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (normed * weight).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + cols, y, mask=mask)


def _check_norm_inputs(x: torch.Tensor, weight: torch.Tensor) -> None:
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
    hidden = x.shape[1]
    require(weight.shape[0] == hidden, "weight has {} elements, x rows {}", weight.shape[0], hidden)
    require(
        0 < hidden <= _MAX_HIDDEN, "hidden size must be in (0, {}], got {}", _MAX_HIDDEN, hidden
    )
    check_launchable(_rms_norm_kernel, x.device)


def _norm_warps(block: int) -> int:
    # About 16 elements per thread: enough bytes in flight per thread without spilling.
    return min(16, max(1, block // 512))


def _launch_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    num_tokens, hidden = x.shape
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    summed = torch.empty_like(x) if residual is not None else None
    if num_tokens == 0:
        return out, summed
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_tokens,)](
        x,
        residual if residual is not None else x,  # unused when HAS_RESIDUAL is false
        weight,
        out,
        summed if summed is not None else out,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        summed.stride(0) if summed is not None else 0,
        hidden,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=_norm_warps(block),
    )
    return out, summed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton ``rms_norm_ref``: x (T, hidden) -> (T, hidden) in promote(x, weight) dtype."""
    _check_norm_inputs(x, weight)
    out, _ = _launch_norm(x, None, weight, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``fused_add_rms_norm_ref``: returns (rms_norm(x + residual), x + residual)."""
    _check_norm_inputs(x, weight)
    check_tensor("residual", residual, ndim=2, dtypes=(x.dtype,), device=x.device)
    require(residual.shape == x.shape, "residual {} != x {}", tuple(residual.shape), tuple(x.shape))
    out, summed = _launch_norm(x, residual, weight, eps)
    assert summed is not None
    return out, summed
