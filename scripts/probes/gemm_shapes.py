"""The 8B decode step's GEMMs at serving batch sizes, against the tensor-core peak measured in
the same run (issue 14's engine target: the GEMMs set a batch-256 step's time).

    python -m scripts.probes.gemm_shapes --out /tmp/gemm.json

For each Llama-3.1-8B projection at M = 256 and 512 tokens it times ``F.linear`` with the
weight as the engine stores it (N, K), ``torch.mm`` with a pre-transposed (K, N) weight, and
both under cuBLASLt, and sums one step's worth (32 layers + the LM head).
"""

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import environment
from bench.kernels import _gemm_tflops, graphed, time_ms

# (name, N, K, times per step) for hidden 4096, 32/8 heads of 128, intermediate 14336.
PROJECTIONS = (
    ("qkv", 6144, 4096, 32),
    ("o", 4096, 4096, 32),
    ("gate_up", 28672, 4096, 32),
    ("down", 4096, 14336, 32),
    ("lm_head", 128256, 4096, 1),
)


def _variants(x: torch.Tensor, w: torch.Tensor) -> dict[str, Callable[[], Any]]:
    w_t = w.t().contiguous()
    return {"linear": lambda: F.linear(x, w), "mm_kn": lambda: torch.mm(x, w_t)}


def _time_all(m: int, device: torch.device, blas: str) -> dict[str, dict[str, float]]:
    torch.backends.cuda.preferred_blas_library(blas)
    rows: dict[str, dict[str, float]] = {}
    for name, n, k, _ in PROJECTIONS:
        x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
        w = torch.randn(n, k, dtype=torch.bfloat16, device=device) * 0.02
        rows[name] = {
            variant: time_ms(graphed(fn), device, 10, 50)
            for variant, fn in _variants(x, w).items()
        }
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    peak = _gemm_tflops(8192, torch.bfloat16, device, 25, 100)
    print(f"bf16 GEMM peak (8192^3, cuBLAS): {peak:.0f} TFLOP/s")
    report: dict[str, Any] = {"environment": environment(), "peak_tflops": peak, "runs": []}
    for m in (256, 512):
        for blas in ("cublas", "cublaslt"):
            rows = _time_all(m, device, blas)
            for variant in ("linear", "mm_kn"):
                step_ms = sum(rows[name][variant] * count for name, _, _, count in PROJECTIONS)
                flops = sum(2 * m * n * k * count for _, n, k, count in PROJECTIONS)
                detail = " ".join(f"{name}={rows[name][variant] * 1e3:.0f}us" for name in rows)
                print(
                    f"M={m} {blas:8s} {variant:6s}: {step_ms:.2f} ms/step "
                    f"{flops / step_ms / 1e9:.0f} TFLOP/s ({detail})"
                )
            report["runs"].append({"m": m, "blas": blas, "rows": rows})
    torch.backends.cuda.preferred_blas_library("cublas")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
