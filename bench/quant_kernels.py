"""The ``quant`` group of bench/kernels.py: int8 (W8A16) and fp8 (W8A8) linear kernels on one
Llama layer's projections, each against its limit (HBM read for batch 1..256, tensor-core
TFLOP/s for prefill) with cuBLAS bf16 (``F.linear`` on the dequantized weight) as the peer.

    python -m bench.kernels --only quant gemv --out bench/results/kernels-quant-h200.json
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from bench.kernels import TARGET_PREFILL_PEAK, Case, Shapes, _nbytes
from kernels.gguf_linear import GGUFPlanes, dequantize_ref, gguf_linear
from kernels.quant import per_token_fp8, per_token_fp8_ref, quantize_fp8_rows, quantize_int8_rows
from kernels.quant_gemm import fp8_scaled_mm, quant_gemm
from kernels.quant_gemv import quant_gemv

#: The issue's bar for batch-1 GEMV: 85% of HBM read.
TARGET_GEMV_HBM = 0.85
DECODE_BATCHES = (64, 256)


def _projections(s: Shapes) -> dict[str, tuple[int, int]]:
    heads_width = (s.heads + 2 * s.kv_heads) * s.head_dim
    return {
        "qkv": (heads_width, s.hidden),
        "gate_up": (2 * s.intermediate, s.hidden),
        "down": (s.hidden, s.intermediate),
    }


def _linear_cases(
    kind: str, name: str, num_out: int, width: int, s: Shapes, device: torch.device
) -> list[Case]:
    w = torch.randn(num_out, width, device=device) * 0.01
    qweight, w_scale = quantize_int8_rows(w) if kind == "int8" else quantize_fp8_rows(w)
    del w
    dense = (qweight.float() * w_scale[:, None]).to(s.dtype)  # the peer's bf16 weight
    weight_bytes = _nbytes(qweight, w_scale)
    cases = []
    for rows in (1, *DECODE_BATCHES, s.prefill_tokens):
        x = torch.randn(rows, width, dtype=s.dtype, device=device)
        x_scale = None
        if kind == "fp8":  # the kernel takes the token already quantized (timed separately)
            x, x_scale = per_token_fp8_ref(x)
        peer_x = x.float() * x_scale if x_scale is not None else x
        peer = partial(F.linear, peer_x.to(s.dtype), dense)
        run = quant_gemv if rows == 1 else quant_gemm
        ours = partial(run, x, qweight, w_scale, None, x_scale, s.dtype)
        shape = f"{name} {num_out}x{width} M={rows}"
        is_prefill = rows == s.prefill_tokens
        moved = weight_bytes + _nbytes(x) + rows * num_out * s.dtype.itemsize
        work = {"flops": 2.0 * rows * num_out * width} if is_prefill else {"bytes_moved": moved}
        target = TARGET_PREFILL_PEAK if is_prefill else TARGET_GEMV_HBM
        compute = "fp8" if kind == "fp8" else "bf16"
        label = f"{kind}_{'gemv' if rows == 1 else 'gemm'}"
        cases.append(Case(label, shape, ours, peer, target=target, compute=compute, **work))
        if kind == "fp8" and rows > 1 and device.type == "cuda":
            assert x_scale is not None
            lt = partial(fp8_scaled_mm, x, x_scale, qweight, w_scale, None, s.dtype)
            cases.append(
                Case("fp8_scaled_mm", shape, lt, peer, target=target, compute=compute, **work)
            )
    return cases


def _random_planes(kind: str, num_out: int, width: int, device: torch.device) -> GGUFPlanes:
    """Random block-format weights (any bits are valid blocks); small scales keep y finite."""
    blocks = width // 32
    d = (torch.rand(num_out, blocks, device=device) * 1e-3).half()
    if kind == "Q8_0":
        quants = torch.randint(-127, 128, (num_out, width), dtype=torch.int8, device=device)
        return GGUFPlanes(kind, quants, d, None)
    quants = torch.randint(0, 256, (num_out, width // 2), dtype=torch.uint8, device=device)
    m = (-8 * d.float()).half() if kind == "Q4_1" else None
    return GGUFPlanes(kind, quants, d, m)


def gguf_cases(s: Shapes, device: torch.device) -> list[Case]:
    """GGUF blocks dequantized in the GEMM tile (batch 1 and prefill), cuBLAS bf16 on the
    dequantized weight as the peer."""
    cases = []
    for kind in ("Q4_1", "Q8_0"):
        for name, (num_out, width) in _projections(s).items():
            planes = _random_planes(kind, num_out, width, device)
            dense = dequantize_ref(planes).to(s.dtype)
            plane_bytes = sum(_nbytes(t) for t in (planes.quants, planes.d) if t is not None)
            for rows in (1, s.prefill_tokens):
                x = torch.randn(rows, width, dtype=s.dtype, device=device)
                is_prefill = rows > 1
                work = (
                    {"flops": 2.0 * rows * num_out * width}
                    if is_prefill
                    else {"bytes_moved": plane_bytes + _nbytes(x)}
                )
                cases.append(
                    Case(
                        f"gguf_{kind.lower()}",
                        f"{name} {num_out}x{width} M={rows}",
                        partial(gguf_linear, x, planes, None),
                        partial(F.linear, x, dense),
                        target=TARGET_PREFILL_PEAK if is_prefill else TARGET_GEMV_HBM,
                        **work,
                    )
                )
    return cases


def quant_cases(s: Shapes, device: torch.device) -> list[Case]:
    cases = gguf_cases(s, device)
    for kind in ("int8", "fp8"):
        for name, (num_out, width) in _projections(s).items():
            cases.extend(_linear_cases(kind, name, num_out, width, s, device))
    for tokens in (1, s.prefill_tokens):
        x = torch.randn(tokens, s.hidden, dtype=s.dtype, device=device)
        moved = _nbytes(x) + tokens * s.hidden + 4 * tokens  # read x, write e4m3 and scales
        cases.append(
            Case(
                "per_token_fp8",
                f"T={tokens} hidden={s.hidden}",
                partial(per_token_fp8, x),
                partial(per_token_fp8_ref, x),
                bytes_moved=moved,
            )
        )
    return cases
