"""Triton gemv (batch-1 linear layer) against its torch reference."""

from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import torch

from kernels.gemv import gemv, gemv_ref

Poisoned = Callable[[], AbstractContextManager[None]]

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


# 576/1536: SmolLM2 widths (K not a multiple of the 1024-column tile); 2048: whole tiles;
# 13 output rows: a partial row block.
@pytest.mark.parametrize(("num_out", "width"), [(13, 576), (64, 2048), (40, 1536)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_reference(
    num_out: int,
    width: int,
    with_bias: bool,
    dtype: torch.dtype,
    device: torch.device,
    poisoned: Poisoned,
) -> None:
    x = torch.randn(1, width, dtype=dtype, device=device)
    weight = torch.randn(num_out, width, dtype=dtype, device=device) / width**0.5
    bias = torch.randn(num_out, dtype=dtype, device=device) if with_bias else None
    with poisoned():
        y = gemv(x, weight, bias)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(y, gemv_ref(x, weight, bias), atol=tol, rtol=tol)


def test_gemv_row_strided_weight(device: torch.device) -> None:
    weight = torch.randn(32, 2 * 96, device=device)[:, :96]  # rows 192 elements apart
    x = torch.randn(1, 96, device=device)
    torch.testing.assert_close(gemv(x, weight, None), gemv_ref(x, weight, None))


def test_gemv_rejects_more_than_one_row(device: torch.device) -> None:
    with pytest.raises(ValueError, match="x must be"):
        gemv(torch.randn(2, 8, device=device), torch.randn(4, 8, device=device), None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gemv_llama_down_projection_on_gpu(dtype: torch.dtype) -> None:
    x = torch.randn(1, 14336, dtype=dtype, device="cuda")
    weight = torch.randn(4096, 14336, dtype=dtype, device="cuda") * 0.01
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(gemv(x, weight, None), gemv_ref(x, weight, None), atol=tol, rtol=tol)
