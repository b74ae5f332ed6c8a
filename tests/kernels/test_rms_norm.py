"""Triton rms_norm / fused_add_rms_norm against their torch references."""

from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import torch

from kernels.rms_norm import (
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
)

Poisoned = Callable[[], AbstractContextManager[None]]

# Same-dtype reference with the same roundings: a 1/sqrt ulp can flip one output ulp.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

SHAPES = [(1, 64), (7, 300), (33, 1024)]  # hidden 300: not a power of two


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    tol = TOLERANCE[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference(
    shape: tuple[int, int], dtype: torch.dtype, device: torch.device, poisoned: Poisoned
) -> None:
    x = torch.randn(shape, dtype=dtype, device=device) * 3
    weight = torch.randn(shape[1], dtype=dtype, device=device)
    with poisoned():
        out = rms_norm(x, weight, 1e-6)
    _close(out, rms_norm_ref(x, weight, 1e-6))


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_add_rms_norm_matches_reference(
    shape: tuple[int, int], dtype: torch.dtype, device: torch.device, poisoned: Poisoned
) -> None:
    x = torch.randn(shape, dtype=dtype, device=device)
    residual = torch.randn(shape, dtype=dtype, device=device)
    weight = torch.randn(shape[1], dtype=dtype, device=device)
    with poisoned():
        out, summed = fused_add_rms_norm(x, residual, weight, 1e-5)
    out_ref, summed_ref = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    torch.testing.assert_close(summed, summed_ref, atol=0, rtol=0)
    _close(out, out_ref)


def test_rms_norm_strided_rows_and_float32_weight(device: torch.device) -> None:
    # A row-strided view (every other row) and a float32 weight over half-precision
    # activations (output dtype promotes to float32, as in the reference).
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x = torch.randn(10, 96, dtype=dtype, device=device)[::2]
    weight = torch.rand(96, dtype=torch.float32, device=device)
    out = rms_norm(x, weight, 1e-6)
    expected = rms_norm_ref(x, weight, 1e-6)
    assert out.dtype == expected.dtype
    _close(out, expected)


def test_rms_norm_empty_batch(device: torch.device) -> None:
    x = torch.empty(0, 64, device=device)
    assert rms_norm(x, torch.ones(64, device=device), 1e-6).shape == (0, 64)


@pytest.mark.parametrize(
    ("x_shape", "weight_shape", "message"),
    [
        ((4, 64), (32,), "weight has 32 elements"),
        ((4, 2, 64), (64,), "x must be 2-D"),
        ((4, 64), (4, 64), "weight must be 1-D"),
    ],
)
def test_rms_norm_rejects_bad_shapes(
    x_shape: tuple[int, ...], weight_shape: tuple[int, ...], message: str, device: torch.device
) -> None:
    with pytest.raises(ValueError, match=message):
        rms_norm(
            torch.randn(x_shape, device=device), torch.randn(weight_shape, device=device), 1e-6
        )


def test_rms_norm_rejects_non_unit_last_stride(device: torch.device) -> None:
    x = torch.randn(64, 4, device=device).t()
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        rms_norm(x, torch.ones(64, device=device), 1e-6)


def test_fused_add_rms_norm_rejects_mismatched_residual(device: torch.device) -> None:
    x = torch.randn(4, 64, device=device)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm(
            x, torch.randn(3, 64, device=device), torch.ones(64, device=device), 1e-6
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hidden", [2048, 4096, 5120, 8192])
def test_fused_add_rms_norm_model_sizes_on_gpu(hidden: int, dtype: torch.dtype) -> None:
    x = torch.randn(257, hidden, dtype=dtype, device="cuda")
    residual = torch.randn_like(x)
    weight = torch.randn(hidden, dtype=dtype, device="cuda")
    out, summed = fused_add_rms_norm(x, residual, weight, 1e-5)
    out_ref, summed_ref = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    torch.testing.assert_close(summed, summed_ref, atol=0, rtol=0)
    _close(out, out_ref)
