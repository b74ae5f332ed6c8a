"""Batch-1 decode is weight reads: how close do the Llama-3.1-8B projections get to HBM
bandwidth, per way of computing y = x W^T? (cuBLAS through F.linear, cuBLAS on a transposed
copy, and a plain Triton GEMV over a grid of tile sizes.) GPU only.

    python -m scripts.probes.gemv_probe --out bench/results/gemv_probe_h100.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import triton
import triton.language as tl

from bench.kernels import _read_gbps, graphed, time_ms

# (name, out_features N, in_features K) of one Llama-3.1-8B layer, plus the LM head.
SHAPES = [
    ("qkv", 6144, 4096),
    ("o", 4096, 4096),
    ("gate_up", 28672, 4096),
    ("down", 4096, 14336),
    ("lm_head", 128256, 4096),
]
TILES = [(bn, bk, w) for bn in (4, 8, 16, 32) for bk in (256, 512, 1024) for w in (4, 8)]


@triton.jit
def _gemv_kernel(
    x_ptr: tl.tensor,
    w_ptr: tl.tensor,
    y_ptr: tl.tensor,
    n: int,
    k: int,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
) -> None:
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rows[:, None] * k + cols[None, :], mask=row_ok[:, None], other=0.0)
        x = tl.load(x_ptr + cols)
        acc += tl.sum(w.to(tl.float32) * x[None, :].to(tl.float32), axis=1)
    tl.store(y_ptr + rows, acc.to(y_ptr.dtype.element_ty), mask=row_ok)


def triton_gemv(x: torch.Tensor, w: torch.Tensor, tile: tuple[int, int, int]) -> torch.Tensor:
    block_n, block_k, warps = tile
    n, k = w.shape
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n),)
    _gemv_kernel[grid](x, w, y, n, k, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return y


def rate(fn: Callable[[], Any], nbytes: int, device: torch.device) -> tuple[float, float]:
    ms = time_ms(graphed(fn), device, warmup=10, rep=50)
    return ms, nbytes / ms / 1e6


def probe_shape(name: str, n: int, k: int, device: torch.device) -> dict[str, Any]:
    w = torch.randn(n, k, dtype=torch.bfloat16, device=device) * 0.02
    w_t = w.t().contiguous()
    x = torch.randn(1, k, dtype=torch.bfloat16, device=device)
    nbytes = w.numel() * 2
    expected = torch.nn.functional.linear(x, w)[0].float()
    row: dict[str, Any] = {"shape": name, "n": n, "k": k, "mbytes": nbytes / 1e6}
    row["f_linear_ms"], row["f_linear_gbps"] = rate(
        lambda: torch.nn.functional.linear(x, w), nbytes, device
    )
    row["matmul_wt_ms"], row["matmul_wt_gbps"] = rate(lambda: x @ w_t, nbytes, device)
    best: tuple[float, tuple[int, int, int]] | None = None
    for tile in TILES:
        if k % tile[1]:
            continue
        got = triton_gemv(x[0], w, tile).float()
        if not torch.allclose(got, expected, atol=2e-2, rtol=2e-2):
            continue
        ms, _ = rate(partial(triton_gemv, x[0], w, tile), nbytes, device)
        if best is None or ms < best[0]:
            best = (ms, tile)
    if best is not None:
        row["triton_ms"], row["triton_tile"] = best[0], list(best[1])
        row["triton_gbps"] = nbytes / best[0] / 1e6
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gemv_probe needs CUDA", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    limit = _read_gbps(1 << 30, device, 5, 20)
    rows = [probe_shape(*shape, device) for shape in SHAPES]
    for row in rows:
        print(
            f"{row['shape']:>8} {row['mbytes']:8.1f} MB  F.linear {row['f_linear_gbps']:6.0f}  "
            f"x@Wt {row['matmul_wt_gbps']:6.0f}  triton {row.get('triton_gbps', 0):6.0f} GB/s "
            f"{row.get('triton_tile')}  (limit {limit:.0f})"
        )
    layer = [r for r in rows if r["shape"] != "lm_head"]
    per_layer_ms = {
        key: sum(r[f"{key}_ms"] for r in layer) for key in ("f_linear", "matmul_wt", "triton")
    }
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "command": "python -m scripts.probes.gemv_probe " + " ".join(sys.argv[1:]),
        "hbm_read_gbps": limit,
        "rows": rows,
        "ms_per_layer": per_layer_ms,
    }
    print(json.dumps({"ms_per_layer": per_layer_ms}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
