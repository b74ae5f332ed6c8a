"""Quantizers (per-channel weights, per-token fp8 activations) and the quantized GEMV/GEMM
kernels against their torch references."""

from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import torch

from kernels.quant import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_rows,
    per_token_fp8,
    per_token_fp8_ref,
    quantize_fp8_rows,
    quantize_int8_rows,
)
from kernels.quant_gemm import fp8_scaled_mm, quant_gemm, quant_gemm_ref
from kernels.quant_gemv import quant_gemv, quant_gemv_ref

Poisoned = Callable[[], AbstractContextManager[None]]


def _weight(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    # Rows of very different magnitudes: one scale per row must follow each of them.
    return (
        torch.randn(rows, cols, device=device) * torch.logspace(-3, 1, rows, device=device)[:, None]
    )


def test_int8_rows_round_trip_within_half_a_step(device: torch.device) -> None:
    w = _weight(24, 96, device)
    q, scale = quantize_int8_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (24,)
    assert q.abs().amax(dim=1).eq(127).all()  # each row's peak uses the whole range
    error = (dequantize_rows(q, scale) - w).abs()
    assert (error <= scale[:, None] / 2 + 1e-9).all()


def test_fp8_rows_relative_error(device: torch.device) -> None:
    w = _weight(24, 96, device)
    q, scale = quantize_fp8_rows(w)
    assert q.dtype == FP8_DTYPE
    assert torch.allclose(q.float().abs().amax(dim=1), torch.full((24,), FP8_MAX, device=device))
    # e4m3 keeps 3 mantissa bits: at most 1/16 relative error above its subnormal range
    back = dequantize_rows(q, scale)
    normal = w.abs() > scale[:, None] * 2**-6
    assert ((back - w).abs()[normal] <= w.abs()[normal] / 16 + 1e-9).all()


def test_zero_row_gets_a_usable_scale(device: torch.device) -> None:
    w = torch.zeros(3, 16, device=device)
    for quantize in (quantize_int8_rows, quantize_fp8_rows):
        q, scale = quantize(w)
        assert (scale > 0).all() and q.float().eq(0).all()


@pytest.mark.parametrize(("rows", "width"), [(1, 576), (5, 100), (33, 2048)])
def test_per_token_fp8_matches_reference(
    rows: int, width: int, dtype: torch.dtype, device: torch.device
) -> None:
    x = (
        torch.randn(rows, width, dtype=dtype, device=device)
        * torch.arange(1, rows + 1, device=device)[:, None]
    )
    q, scale = per_token_fp8(x)
    q_ref, scale_ref = per_token_fp8_ref(x)
    torch.testing.assert_close(scale, scale_ref)
    torch.testing.assert_close(q.float(), q_ref.float(), atol=0, rtol=2**-3)
    # rounding may differ on an exact tie only: nearly every element is bit-identical
    assert (q.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean() > 0.99


def _quantized(
    kind: str, rows: int, width: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(rows, width, device=device) / width**0.5
    return quantize_int8_rows(w) if kind == "int8" else quantize_fp8_rows(w)


# 576/1536: SmolLM2 widths (K not a multiple of the column tile); 13 rows: a partial row block.
@pytest.mark.parametrize(("num_out", "width"), [(13, 576), (64, 2048), (40, 1536)])
@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_quant_gemv_matches_reference(
    num_out: int,
    width: int,
    kind: str,
    with_bias: bool,
    dtype: torch.dtype,
    device: torch.device,
    poisoned: Poisoned,
) -> None:
    qweight, w_scale = _quantized(kind, num_out, width, device)
    x = torch.randn(1, width, dtype=dtype, device=device)
    bias = torch.randn(num_out, dtype=dtype, device=device) if with_bias else None
    x_scale = None
    if kind == "fp8":  # W8A8: the token goes in quantized
        x, x_scale = per_token_fp8_ref(x)
    with poisoned():
        y = quant_gemv(x, qweight, w_scale, bias, x_scale, out_dtype=dtype)
    expected = quant_gemv_ref(x, qweight, w_scale, bias, x_scale, out_dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize(("rows", "num_out", "width"), [(1, 40, 96), (7, 130, 200), (70, 64, 576)])
@pytest.mark.parametrize("kind", ["int8", "fp8", "fp8_weight_only"])
def test_quant_gemm_matches_reference(
    rows: int,
    num_out: int,
    width: int,
    kind: str,
    dtype: torch.dtype,
    device: torch.device,
    poisoned: Poisoned,
) -> None:
    qweight, w_scale = _quantized("int8" if kind == "int8" else "fp8", num_out, width, device)
    x = torch.randn(rows, width, dtype=dtype, device=device)
    bias = torch.randn(num_out, dtype=dtype, device=device)
    x_scale = None
    if kind == "fp8":
        x, x_scale = per_token_fp8_ref(x)
    with poisoned():
        y = quant_gemm(x, qweight, w_scale, bias, x_scale, out_dtype=dtype)
    expected = quant_gemm_ref(x, qweight, w_scale, bias, x_scale, out_dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, expected, atol=tol, rtol=tol)


def test_scaled_mm_matches_reference(device: torch.device) -> None:
    """torch._scaled_mm with row-wise scales is the same W8A8 product (CPU and CUDA)."""
    qweight, w_scale = _quantized("fp8", 48, 64, device)
    xq, x_scale = per_token_fp8_ref(torch.randn(5, 64, device=device))
    bias = torch.randn(48, device=device)
    out_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    y = fp8_scaled_mm(xq, x_scale, qweight, w_scale, bias.to(out_dtype), out_dtype)
    expected = quant_gemm_ref(xq, qweight, w_scale, bias, x_scale, out_dtype=torch.float32)
    tol = 1e-4 if out_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), expected, atol=tol, rtol=tol)


def test_quantized_product_stays_close_to_float(device: torch.device) -> None:
    """Per-channel int8 and fp8 W8A8 with float32 accumulation: about 1% of the float product."""
    w = torch.randn(256, 1024, device=device) / 32
    x = torch.randn(4, 1024, device=device)
    exact = x @ w.t()
    q8, s8 = quantize_int8_rows(w)
    int8 = quant_gemm_ref(x, q8, s8, None)
    qf, sf = quantize_fp8_rows(w)
    xq, xs = per_token_fp8_ref(x)
    fp8 = quant_gemm_ref(xq, qf, sf, None, xs, out_dtype=torch.float32)
    norm = exact.norm()
    assert (int8 - exact).norm() / norm < 0.01
    assert (fp8 - exact).norm() / norm < 0.05


def test_quant_gemm_rejects_fp8_activations_with_int8_weights(device: torch.device) -> None:
    q8, s8 = _quantized("int8", 16, 32, device)
    xq, xs = per_token_fp8_ref(torch.randn(2, 32, device=device))
    with pytest.raises(ValueError, match="qweight dtype"):
        quant_gemm(xq, q8, s8, None, xs, out_dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quant_kernels_llama_shapes_on_gpu(kind: str) -> None:
    qweight, w_scale = _quantized(kind, 4096, 14336, torch.device("cuda"))
    for rows in (1, 64, 300):
        x = torch.randn(rows, 14336, dtype=torch.bfloat16, device="cuda")
        x_scale = None
        if kind == "fp8":
            x, x_scale = per_token_fp8(x)
        run = quant_gemv if rows == 1 else quant_gemm
        y = run(x, qweight, w_scale, None, x_scale, out_dtype=torch.bfloat16)
        expected = quant_gemm_ref(x, qweight, w_scale, None, x_scale, out_dtype=torch.bfloat16)
        torch.testing.assert_close(y, expected, atol=2e-2, rtol=2e-2)
