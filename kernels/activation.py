"""Gated activations for MLPs whose gate and up projections are one GEMM: SiLU-and-multiply
(SwiGLU: Llama, Qwen, Mistral, Phi-3) and tanh-GELU-and-multiply (GeGLU: Gemma 2)."""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check_launchable, check_tensor, require


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: (T, 2 * I) with the gate in the first half -> (T, I)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: (T, 2 * I), gate first -> gelu(gate, approximate="tanh") * up, (T, I)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


# ---------------------------------------------------------------------------------------------
# Triton implementation: a 2-D grid over (token, column block) of the output.

_SQRT_2_OVER_PI = 0.7978845608028654


@triton.jit
def _gated_act_kernel(
    gate_up_ptr: tl.tensor,
    out_ptr: tl.tensor,
    stride_in: tl.tensor,
    stride_out: tl.tensor,
    intermediate: tl.tensor,
    BLOCK: tl.constexpr,
    GELU: tl.constexpr,
) -> None:
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate_ptr = gate_up_ptr + row * stride_in + cols
    gate = tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptr + intermediate, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        # 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3).
        inner = _SQRT_2_OVER_PI * (gate + 0.044715 * gate * gate * gate)
        act = gate * tl.sigmoid(2.0 * inner)
    else:
        act = gate * tl.sigmoid(gate)
    # Round the activation to the output dtype before the product, as F.silu(gate) * up does.
    act = act.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(
        out_ptr + row * stride_out + cols,
        (act * up).to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def _gated_act(gate_up: torch.Tensor, gelu: bool) -> torch.Tensor:
    check_tensor("gate_up", gate_up, ndim=2, dtypes=FLOAT_DTYPES, device=gate_up.device)
    num_tokens, width = gate_up.shape
    require(width % 2 == 0, "gate_up last dim must be even (gate then up), got {}", width)
    check_launchable(_gated_act_kernel, gate_up.device)
    intermediate = width // 2
    out = torch.empty((num_tokens, intermediate), dtype=gate_up.dtype, device=gate_up.device)
    if out.numel() == 0:
        return out
    # 1024 columns per program: 2 KiB (bf16) per load stream, 8 elements per thread.
    block = min(1024, triton.next_power_of_2(intermediate))
    grid = (num_tokens, triton.cdiv(intermediate, block))
    _gated_act_kernel[grid](
        gate_up,
        out,
        gate_up.stride(0),
        out.stride(0),
        intermediate,
        BLOCK=block,
        GELU=gelu,
        num_warps=4,
    )
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton ``silu_and_mul_ref``: gate_up (T, 2 * I), gate first -> (T, I)."""
    return _gated_act(gate_up, gelu=False)


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton ``gelu_tanh_and_mul_ref``: gate_up (T, 2 * I), gate first -> (T, I)."""
    return _gated_act(gate_up, gelu=True)
