"""``pdmesh bench sweep``: DistServe's experiment. The same workers, colocated or
disaggregated (e.g. 2 colocated workers vs 1 prefill + 1 decode), under the same requests at
rising request rates: SLO attainment and goodput against rate, in one plot.

    pdmesh bench sweep --workers 2 --request-rate 0.25 0.5 1 --num-requests 16 \\
        --slo-ttft-ms 3000 --slo-tpot-ms 300 --out bench/results/sweep_cpu.json

Each layout runs as an in-process mesh, started and stopped by the sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from pdmesh.bench import plots
from pdmesh.bench.env import environment, write_json
from pdmesh.bench.meshes import recorded_config, serving
from pdmesh.bench.serve import (
    add_output_args,
    add_slo_args,
    add_target_args,
    add_workload_args,
    mesh_config,
    model_info,
    output_stem,
    plot_dir,
    run_points,
    slo_title,
    workload_spec,
)
from pdmesh.bench.workload import make_workload

MODES = ("colocated", "disaggregated")


def add_args(parser: argparse.ArgumentParser) -> None:
    add_target_args(parser)
    parser.set_defaults(target=None)
    parser.add_argument("--workers", type=int, default=2, help="workers in each layout")
    parser.add_argument(
        "--prefill", type=int, help="prefill workers of the disaggregated layout (default half)"
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--request-rate", type=float, nargs="+", required=True)
    parser.add_argument("--burstiness", type=float, default=1.0)
    parser.set_defaults(concurrency=None)
    add_workload_args(parser)
    add_slo_args(parser)
    add_output_args(parser)


def layout(args: argparse.Namespace, mode: str) -> tuple[int, int]:
    """(prefill or colocated workers, decode workers) of ``mode`` with ``--workers`` in all."""
    if args.workers < 2:
        raise ValueError("a sweep needs at least 2 workers (1 prefill + 1 decode)")
    if mode == "colocated":
        return args.workers, 0
    prefill = args.prefill or args.workers // 2
    if not 1 <= prefill < args.workers:
        raise ValueError(f"--prefill must be in [1, {args.workers - 1}]")
    return prefill, args.workers - prefill


def main(args: argparse.Namespace) -> int:
    if args.target:
        raise ValueError("bench sweep starts its own meshes; --target is not used")
    spec = workload_spec(args)
    series: dict[str, list[dict[str, Any]]] = {}
    layouts: dict[str, Any] = {}
    model = ""
    for mode in args.modes:
        prefill, decode = layout(args, mode)
        config = mesh_config(args, mode, prefill, decode)
        name = f"{mode} ({prefill}P+{decode}D)" if decode else f"{mode} ({prefill}x)"
        print(f"== {name}", flush=True)
        with serving(None, config) as target:
            info = model_info(target)
            model = info.model
            requests = make_workload(spec, info.vocab_size, info.max_model_len)
            series[name] = run_points(target, requests, args, name)
        layouts[name] = recorded_config(config)
    stem, folder = output_stem(args, "sweep"), plot_dir(args)
    title = f"{model}, {args.workers} workers: colocated vs disaggregated ({slo_title(args)})"
    files = []
    if plots.available():
        files.append(plots.slo_vs_rate(series, f"{folder}/{stem}_slo.png", title))
        runs = [run for runs in series.values() for run in runs]
        files.append(plots.latency_cdfs(runs, f"{folder}/{stem}_latency_cdf.png", title))
    write_json(
        args.out,
        {
            "benchmark": "sweep",
            **environment(getattr(args, "argv", None)),
            "model": model,
            "workload": dataclasses.asdict(spec),
            "layouts": layouts,
            "plots": files,
            "series": series,
        },
    )
    return 0
