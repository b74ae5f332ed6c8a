"""SiLU-and-multiply for gated MLPs whose gate and up projections are one GEMM."""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._checks import FLOAT_DTYPES, check_launchable, check_tensor, require


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: (T, 2 * I) with the gate in the first half -> (T, I)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------------
# Triton implementation: a 2-D grid over (token, column block) of the output.


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr: tl.tensor,
    out_ptr: tl.tensor,
    stride_in: tl.tensor,
    stride_out: tl.tensor,
    intermediate: tl.tensor,
    BLOCK: tl.constexpr,
) -> None:
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate_ptr = gate_up_ptr + row * stride_in + cols
    gate = tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptr + intermediate, mask=mask, other=0.0).to(tl.float32)
    # Round silu(gate) to the activation dtype before the product, as F.silu(gate) * up does.
    act = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(
        out_ptr + row * stride_out + cols,
        (act * up).to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton ``silu_and_mul_ref``: gate_up (T, 2 * I), gate first -> (T, I)."""
    check_tensor("gate_up", gate_up, ndim=2, dtypes=FLOAT_DTYPES, device=gate_up.device)
    num_tokens, width = gate_up.shape
    require(width % 2 == 0, "gate_up last dim must be even (gate then up), got {}", width)
    check_launchable(_silu_and_mul_kernel, gate_up.device)
    intermediate = width // 2
    out = torch.empty((num_tokens, intermediate), dtype=gate_up.dtype, device=gate_up.device)
    if out.numel() == 0:
        return out
    # 1024 columns per program: 2 KiB (bf16) per load stream, 8 elements per thread.
    block = min(1024, triton.next_power_of_2(intermediate))
    grid = (num_tokens, triton.cdiv(intermediate, block))
    _silu_and_mul_kernel[grid](
        gate_up,
        out,
        gate_up.stride(0),
        out.stride(0),
        intermediate,
        BLOCK=block,
        num_warps=4,
    )
    return out
