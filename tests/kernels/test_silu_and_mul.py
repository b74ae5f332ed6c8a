"""Triton silu_and_mul and gelu_tanh_and_mul against their torch references."""

from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import torch

from kernels.activation import (
    gelu_tanh_and_mul,
    gelu_tanh_and_mul_ref,
    silu_and_mul,
    silu_and_mul_ref,
)

Poisoned = Callable[[], AbstractContextManager[None]]

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


# 1000: not a power of two; 1536: more than one column block per row.
@pytest.mark.parametrize(("num_tokens", "intermediate"), [(1, 64), (5, 1000), (9, 1536)])
def test_silu_and_mul_matches_reference(
    num_tokens: int,
    intermediate: int,
    dtype: torch.dtype,
    device: torch.device,
    poisoned: Poisoned,
) -> None:
    gate_up = torch.randn(num_tokens, 2 * intermediate, dtype=dtype, device=device) * 4
    with poisoned():
        out = silu_and_mul(gate_up)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out, silu_and_mul_ref(gate_up), atol=tol, rtol=tol)


@pytest.mark.parametrize(("num_tokens", "intermediate"), [(1, 64), (5, 1000)])
def test_gelu_tanh_and_mul_matches_reference(
    num_tokens: int,
    intermediate: int,
    dtype: torch.dtype,
    device: torch.device,
    poisoned: Poisoned,
) -> None:
    gate_up = torch.randn(num_tokens, 2 * intermediate, dtype=dtype, device=device) * 4
    with poisoned():
        out = gelu_tanh_and_mul(gate_up)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out, gelu_tanh_and_mul_ref(gate_up), atol=tol, rtol=tol)
    # Not the SiLU gate by accident.
    assert (out - silu_and_mul_ref(gate_up)).abs().max() > 0.1


def test_silu_and_mul_row_strided_input(device: torch.device) -> None:
    gate_up = torch.randn(8, 2 * 96, device=device)[1::3]  # rows 1, 4, 7
    torch.testing.assert_close(silu_and_mul(gate_up), silu_and_mul_ref(gate_up))


def test_silu_and_mul_rejects_odd_width(device: torch.device) -> None:
    with pytest.raises(ValueError, match="must be even"):
        silu_and_mul(torch.randn(2, 7, device=device))


def test_silu_and_mul_rejects_wrong_rank(device: torch.device) -> None:
    with pytest.raises(ValueError, match="must be 2-D"):
        silu_and_mul(torch.randn(2, 3, 8, device=device))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_silu_and_mul_llama_width_on_gpu(dtype: torch.dtype) -> None:
    gate_up = torch.randn(100, 2 * 14336, dtype=dtype, device="cuda")
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(silu_and_mul(gate_up), silu_and_mul_ref(gate_up), atol=tol, rtol=tol)
