"""Split-K Triton GEMM against cuBLAS on the 8B decode step's projections (issue 14: the
GEMMs set a batch-256 step's time, and cuBLAS leaves SMs idle on the narrow ones).

    python -m scripts.probes.splitk_gemm --out /tmp/splitk.json

For each projection and M it times ``F.linear`` (cuBLAS) and every Triton config in CONFIGS,
alone (float32 partials) and with the reduction to bf16, and prints the best of each next to
the tensor-core peak measured in the same run.

Measured on one H200 (bench/results/splitk_gemm_h200.json): cuBLAS wins or ties at every
M = 256/512 shape, so the engine keeps F.linear; the kernel lives here with its measurement.
"""

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bench.common import environment
from bench.kernels import _gemm_tflops, graphed, time_ms
from kernels._checks import FLOAT_DTYPES, check_launchable, check_tensor, require
from scripts.probes.gemm_shapes import PROJECTIONS


@dataclass(frozen=True)
class GemmConfig:
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    split_k: int = 2
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 4


def splitk_gemm_ref(x: torch.Tensor, weight: torch.Tensor, split_k: int) -> torch.Tensor:
    """Partials (split_k, M, N) float32: slice s is x[:, Ks] @ W[:, Ks]^T over the s-th of
    split_k equal slices of K."""
    xs = x.float().chunk(split_k, dim=1)
    ws = weight.float().chunk(split_k, dim=1)
    return torch.stack([F.linear(a, w) for a, w in zip(xs, ws, strict=True)])


# ---------------------------------------------------------------------------------------------
# Triton implementation: grid (output tiles, split_k); tiles are visited in groups of group_m
# rows so consecutive programs share W's columns in L2.


@triton.jit
def _tile_coords(
    pid: tl.tensor, m: tl.tensor, n: tl.tensor, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor]:  # fmt: skip
    tiles_m = tl.cdiv(m, BLOCK_M)
    tiles_n = tl.cdiv(n, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % rows_in_group
    tile_n = (pid % per_group) // rows_in_group
    return tile_m, tile_n


@triton.jit
def _splitk_gemm_kernel(
    x_ptr: tl.tensor,
    w_ptr: tl.tensor,
    out_ptr: tl.tensor,
    m: tl.tensor,
    n: tl.tensor,
    k_per_split: tl.tensor,
    stride_x: tl.tensor,
    stride_w: tl.tensor,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
) -> None:
    tile_m, tile_n = _tile_coords(tl.program_id(0), m, n, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = split * k_per_split + tl.arange(0, BLOCK_K)
    # Out-of-range rows/cols read row 0 (always valid) and are never stored: no load masks.
    safe_rows = tl.where(rows < m, rows, 0).to(tl.int64)
    safe_cols = tl.where(cols < n, cols, 0).to(tl.int64)
    x_tile = x_ptr + safe_rows[:, None] * stride_x + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
    w_tile = w_ptr + safe_cols[None, :] * stride_w + offs_k[:, None]  # (BLOCK_K, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, k_per_split, BLOCK_K):
        acc = tl.dot(tl.load(x_tile), tl.load(w_tile), acc)
        x_tile += BLOCK_K
        w_tile += BLOCK_K
    out = out_ptr + split.to(tl.int64) * m * n + rows[:, None].to(tl.int64) * n + cols[None, :]
    tl.store(out, acc, mask=(rows < m)[:, None] & (cols < n)[None, :])


@triton.jit
def _splitk_reduce_kernel(
    part_ptr: tl.tensor, out_ptr: tl.tensor, numel: tl.tensor, SPLIT_K: tl.constexpr,
    BLOCK: tl.constexpr,
) -> None:  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < numel
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        total += tl.load(part_ptr + split * numel + offs, mask=valid, other=0.0)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=valid)


# ---------------------------------------------------------------------------------------------
# Wrappers.


def _check(x: torch.Tensor, weight: torch.Tensor, config: GemmConfig) -> None:
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=x.device)
    k = x.shape[1]
    require(weight.shape[1] == k, "weight has K={}, x has K={}", weight.shape[1], k)
    require(
        k % (config.split_k * config.block_k) == 0,
        "K={} must be a multiple of split_k * block_k = {}",
        k,
        config.split_k * config.block_k,
    )


def splitk_gemm(x: torch.Tensor, weight: torch.Tensor, config: GemmConfig) -> torch.Tensor:
    """Triton ``splitk_gemm_ref``: float32 partials (split_k, M, N)."""
    _check(x, weight, config)
    check_launchable(_splitk_gemm_kernel, x.device)
    m, k = x.shape
    n = weight.shape[0]
    parts = torch.empty((config.split_k, m, n), dtype=torch.float32, device=x.device)
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    _splitk_gemm_kernel[(tiles, config.split_k)](
        x, weight, parts, m, n, k // config.split_k, x.stride(0), weight.stride(0),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return parts


_REDUCE_BLOCK = 1024


def splitk_reduce(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sums (split_k, M, N) float32 partials into (M, N) of dtype."""
    check_tensor("parts", parts, ndim=3, dtypes=(torch.float32,), device=parts.device)
    require(parts.is_contiguous(), "parts must be contiguous")
    split_k, m, n = parts.shape
    out = torch.empty((m, n), dtype=dtype, device=parts.device)
    numel = m * n
    _splitk_reduce_kernel[(triton.cdiv(numel, _REDUCE_BLOCK),)](
        parts, out, numel, SPLIT_K=split_k, BLOCK=_REDUCE_BLOCK, num_warps=4
    )
    return out


def splitk_linear(x: torch.Tensor, weight: torch.Tensor, config: GemmConfig) -> torch.Tensor:
    """y = x W^T in x's dtype through split-K partials."""
    return splitk_reduce(splitk_gemm(x, weight, config), x.dtype)


# (block_m, block_n, block_k, num_warps, num_stages)
TILES = (
    (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
    (64, 256, 64, 8, 3), (128, 64, 64, 4, 4), (128, 128, 128, 8, 3), (64, 64, 128, 4, 4),
)  # fmt: skip
SPLITS = (1, 2, 4)


def _configs(m: int, k: int) -> list[GemmConfig]:
    return [
        GemmConfig(block_m=bm, block_n=bn, block_k=bk, split_k=s, num_warps=w, num_stages=st)
        for bm, bn, bk, w, st in TILES
        for s in SPLITS
        if k % (s * bk) == 0 and bm <= max(64, m)
    ]


def _time(fn: Any, device: torch.device) -> float:
    return time_ms(graphed(fn), device, 10, 50)


def _best_triton(x: torch.Tensor, w: torch.Tensor) -> dict[str, Any]:
    best: dict[str, Any] = {"gemm_ms": float("inf")}
    for config in _configs(x.shape[0], x.shape[1]):
        try:
            gemm_ms = _time(lambda c=config: splitk_gemm(x, w, c), x.device)
        except Exception as error:  # a config the compiler or the SM cannot take
            print(f"  skip {config}: {type(error).__name__}")
            continue
        if gemm_ms < best["gemm_ms"]:
            best = {"gemm_ms": gemm_ms, "config": config.__dict__}
    config = GemmConfig(**best["config"])
    best["with_reduce_ms"] = _time(
        lambda: splitk_reduce(splitk_gemm(x, w, config), x.dtype), x.device
    )
    ref = F.linear(x, w)
    got = splitk_reduce(splitk_gemm(x, w, config), x.dtype)
    best["max_abs_err"] = float((got.float() - ref.float()).abs().max())
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--ms", type=int, nargs="+", default=[64, 128, 256, 512])
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    peak = _gemm_tflops(8192, torch.bfloat16, device, 25, 100)
    print(f"bf16 GEMM peak (8192^3, cuBLAS): {peak:.0f} TFLOP/s")
    report: dict[str, Any] = {"environment": environment(), "peak_tflops": peak, "rows": []}
    for m in args.ms:
        step = {"cublas": 0.0, "triton": 0.0, "best_of_both": 0.0}
        for name, n, k, count in PROJECTIONS:
            x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
            w = torch.randn(n, k, dtype=torch.bfloat16, device=device) * 0.02
            cublas_ms = _time(lambda x=x, w=w: F.linear(x, w), device)
            best = _best_triton(x, w)
            flops = 2 * m * n * k
            row = {"m": m, "name": name, "n": n, "k": k, "cublas_ms": cublas_ms, **best}
            report["rows"].append(row)
            step["cublas"] += cublas_ms * count
            step["triton"] += best["with_reduce_ms"] * count
            step["best_of_both"] += min(cublas_ms, best["with_reduce_ms"]) * count
            print(
                f"M={m} {name:8s} cuBLAS {cublas_ms * 1e3:6.1f} us "
                f"({flops / cublas_ms / 1e9 / peak:4.0%} of peak) | triton gemm "
                f"{best['gemm_ms'] * 1e3:6.1f} us, +reduce {best['with_reduce_ms'] * 1e3:6.1f} us "
                f"({flops / best['with_reduce_ms'] / 1e9 / peak:4.0%}) {best['config']} "
                f"err {best['max_abs_err']:.3g}"
            )
        print(f"M={m} step GEMMs (ms): " + " ".join(f"{k}={v:.2f}" for k, v in step.items()))
        report.setdefault("steps", {})[str(m)] = step
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
