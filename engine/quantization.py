"""How a linear layer stores its weight and multiplies by it: 16/32-bit (unquantized), int8
weight-only (W8A16) or fp8 e4m3 with per-token activation scales (W8A8).

Quantized weights carry one float32 scale per output row (``weight_scale``). A float
checkpoint tensor is quantized as its rows are placed, shard by shard, so a rank never holds
more than its own float shard; an fp8 checkpoint that already carries scales is copied as it
is (``engine.checkpoint_quant`` reads its ``quantization_config``). Layers take the method in
force when they are built (``linear_method(...)`` around model construction), as they take
the tensor-parallel group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine import ops
from engine.config import QUANTIZATIONS
from kernels.quant import FP8_DTYPE, quantize_fp8_rows, quantize_int8_rows

if TYPE_CHECKING:
    from engine.layers import LinearBase

#: Rows quantized at a time when dummy weights are drawn (bounds the float32 scratch).
DUMMY_ROWS = 4096


def copy_rows(param: torch.Tensor, offset: int, loaded: torch.Tensor) -> None:
    """param[offset : offset + len(loaded)] = loaded (the whole param when shapes match)."""
    target = param.data.narrow(0, offset, loaded.shape[0]) if param.dim() else param.data
    if target.shape != loaded.shape:
        raise ValueError(
            f"checkpoint shape {tuple(loaded.shape)} != parameter {tuple(target.shape)}"
        )
    target.copy_(loaded)


class LinearMethod:
    """Unquantized: ``weight`` in the model's dtype, ``x W^T + b``."""

    name = "none"

    def create_weights(self, layer: LinearBase, rows: int, cols: int) -> None:
        layer.weight = nn.Parameter(torch.empty(rows, cols), requires_grad=False)

    def load(
        self, layer: LinearBase, param: torch.Tensor, offset: int, loaded: torch.Tensor
    ) -> None:
        """Places this rank's rows of a checkpoint tensor (weight, bias or scale) at ``offset``."""
        copy_rows(param, offset, loaded)

    def fill_dummy(self, layer: LinearBase) -> None:
        layer.weight.data.normal_(0, 0.02)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return ops.linear(x, layer.weight, bias)


class QuantizedLinearMethod(LinearMethod):
    """One-byte ``weight`` (N, K) and float32 ``weight_scale`` (N,): W stands for q * scale."""

    dtype: torch.dtype

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def create_weights(self, layer: LinearBase, rows: int, cols: int) -> None:
        layer.weight = nn.Parameter(torch.empty(rows, cols, dtype=self.dtype), requires_grad=False)
        layer.weight_scale = nn.Parameter(
            torch.ones(rows, dtype=torch.float32), requires_grad=False
        )

    def load(
        self, layer: LinearBase, param: torch.Tensor, offset: int, loaded: torch.Tensor
    ) -> None:
        if param is not layer.weight or loaded.dtype == self.dtype:
            # biases; scales and weights of a checkpoint quantized the same way
            copy_rows(param, offset, loaded)
            return
        if loaded.dtype in (torch.int8, FP8_DTYPE):
            raise ValueError(
                f"checkpoint weight is {loaded.dtype}, the layer is {self.name}: "
                "pass the checkpoint's own quantization (or none)"
            )
        q, scale = self.quantize(loaded.to(layer.weight_scale.device))
        copy_rows(layer.weight, offset, q)
        copy_rows(layer.weight_scale, offset, scale)

    def fill_dummy(self, layer: LinearBase) -> None:
        rows, cols = layer.weight.shape
        for start in range(0, rows, DUMMY_ROWS):
            count = min(DUMMY_ROWS, rows - start)
            w = torch.randn(count, cols, device=layer.weight.device) * 0.02
            q, scale = self.quantize(w)
            copy_rows(layer.weight, start, q)
            copy_rows(layer.weight_scale, start, scale)


class Int8WeightOnly(QuantizedLinearMethod):
    """W8A16: int8 weights widened to the activations' dtype inside the GEMV/GEMM."""

    name = "int8"
    dtype = torch.int8

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_int8_rows(w)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return ops.int8_linear(x, layer.weight, layer.weight_scale, bias)


class Fp8W8A8(QuantizedLinearMethod):
    """W8A8: fp8 e4m3 weights, activations quantized per token on the fly."""

    name = "fp8"
    dtype = FP8_DTYPE

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_fp8_rows(w)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return ops.fp8_linear(x, layer.weight, layer.weight_scale, bias)


UNQUANTIZED = LinearMethod()
_METHODS: dict[str | None, LinearMethod] = {
    None: UNQUANTIZED,
    "int8": Int8WeightOnly(),
    "fp8": Fp8W8A8(),
}
_current = UNQUANTIZED


def method_for(quantization: str | None) -> LinearMethod:
    if quantization not in _METHODS:
        raise ValueError(
            f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}"
        )
    return _METHODS[quantization]


@contextlib.contextmanager
def linear_method(quantization: str | None) -> Iterator[LinearMethod]:
    """Linear layers constructed inside store and apply their weights this way."""
    global _current
    previous, _current = _current, method_for(quantization)
    try:
        yield _current
    finally:
        _current = previous


def current_linear_method() -> LinearMethod:
    return _current
