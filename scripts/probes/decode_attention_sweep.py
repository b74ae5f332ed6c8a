"""Decode attention launch-parameter sweep at serving batch sizes (issue 14's engine target).

    python -m scripts.probes.decode_attention_sweep --out /tmp/sweep.json

The kernel benchmark's decode cases are long contexts at small batches; a served 8B decode
step at batch 256-512 has contexts of 128-384 tokens, where each (sequence, KV head) program
walks only a few tiles. This times every launch configuration of ``_decode_kernel`` at those
shapes (CUDA-graph replays, median of ``do_bench``) and reports each shape's best next to the
default the wrapper picks and the HBM read bandwidth measured in the same run.
"""

import argparse
import itertools
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from bench.common import environment
from bench.kernels import GPU_SHAPES, _paged_cache, _read_gbps, graphed, time_ms

BATCHES = (256, 512)
CONTEXTS = (128, 256, 384)
BLOCK_NS = (16, 32, 64, 128)
WARPS = (2, 4, 8)
STAGES = (1, 2, 3, 4)
SPLITS = (1, 2)


def _shape_rows(batch: int, context: int, configs: list, warmup: int, rep: int) -> list[dict]:
    from kernels.paged_attention import _decode_config, launch_paged_decode_attention

    s = GPU_SHAPES
    device = torch.device("cuda")
    k_cache, v_cache, tables, seq_lens = _paged_cache(s, [context] * batch, device)
    q = torch.randn(batch, s.heads, s.head_dim, dtype=s.dtype, device=device)
    kv_bytes = 2 * batch * context * s.kv_heads * s.head_dim * q.element_size()
    default = _decode_config(s.head_dim, s.page)
    rows = []
    for config in [default, *configs]:
        def run(config=config):  # type: ignore[no-untyped-def]
            return launch_paged_decode_attention(
                q, k_cache, v_cache, tables, seq_lens, s.head_dim**-0.5, None, config
            )

        ms = time_ms(graphed(run), device, warmup, rep)
        rows.append({"config": asdict(config), "ms": ms, "gbps": kv_bytes / ms / 1e6})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rep", type=int, default=40)
    args = parser.parse_args(argv)
    from kernels.paged_attention import AttentionConfig

    configs = [
        AttentionConfig(block_n=n, num_warps=w, num_stages=st, num_splits=sp)
        for n, w, st, sp in itertools.product(BLOCK_NS, WARPS, STAGES, SPLITS)
    ]
    hbm = _read_gbps(1 << 30, torch.device("cuda"), 25, 100)
    print(f"HBM read {hbm:.0f} GB/s")
    shapes = []
    for batch, context in itertools.product(BATCHES, CONTEXTS):
        rows = _shape_rows(batch, context, configs, args.warmup, args.rep)
        best = min(rows, key=lambda r: r["ms"])
        print(
            f"batch={batch} ctx={context}: default {rows[0]['ms'] * 1e3:.0f} us "
            f"({rows[0]['gbps'] / hbm:.0%} of HBM), best {best['ms'] * 1e3:.0f} us "
            f"({best['gbps'] / hbm:.0%}) with {best['config']}"
        )
        top = sorted(rows[1:], key=lambda r: r["ms"])[:5]
        for r in top:
            c = r["config"]
            print(
                f"    {r['ms'] * 1e3:6.0f} us  n={c['block_n']} w={c['num_warps']} "
                f"st={c['num_stages']} sp={c['num_splits']}"
            )
        shapes.append({"batch": batch, "context": context, "rows": rows})
    if args.out:
        report = {"environment": environment(), "hbm_read_gbps": hbm, "shapes": shapes}
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
