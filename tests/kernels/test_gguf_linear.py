"""GGUF block formats kept quantized: the planes hold the file's bits (dequantizing them equals
the gguf library's dequantize exactly), and the in-kernel dequantizing GEMM matches the
dequantized path."""

import numpy as np
import pytest
import torch

from kernels.gguf_linear import dequantize_ref, gguf_linear, gguf_linear_ref, split_blocks

KINDS = ["Q8_0", "Q4_0", "Q4_1"]


def _blocks(kind: str, rows: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    from gguf import GGMLQuantizationType, quants

    w = np.random.default_rng(rows * width).standard_normal((rows, width)).astype(np.float32)
    w *= np.linspace(0.01, 1.0, rows, dtype=np.float32)[:, None]
    raw = quants.quantize(w, GGMLQuantizationType[kind])
    return raw, quants.dequantize(raw, GGMLQuantizationType[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_planes_dequantize_like_the_gguf_library(kind: str) -> None:
    raw, expected = _blocks(kind, 7, 96)
    planes = split_blocks(torch.from_numpy(raw), kind)
    assert planes.shape == (7, 96)
    assert torch.equal(dequantize_ref(planes), torch.from_numpy(expected))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("rows", "num_out", "width"), [(1, 40, 576), (5, 70, 96), (33, 64, 160)])
def test_gguf_linear_matches_dequantized_path(
    kind: str, rows: int, num_out: int, width: int, dtype: torch.dtype, device: torch.device
) -> None:
    raw, _ = _blocks(kind, num_out, width)
    planes = split_blocks(torch.from_numpy(raw).to(device), kind)
    x = torch.randn(rows, width, dtype=dtype, device=device)
    bias = torch.randn(num_out, dtype=dtype, device=device)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(
        gguf_linear(x, planes, bias), gguf_linear_ref(x, planes, bias), atol=tol, rtol=tol
    )
