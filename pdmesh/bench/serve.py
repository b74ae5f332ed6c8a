"""``pdmesh bench serve``: load a gateway at given request rates (open loop, Poisson or
bursty arrivals) or concurrencies (closed loop), report latency percentiles, throughput and
goodput under SLOs, and plot latency CDFs and SLO attainment against rate.

    pdmesh bench serve --request-rate 0.5 1 2 --num-requests 24 --slo-ttft-ms 2000 \\
        --slo-tpot-ms 200 --out bench/results/serve_cpu.json

Without ``--target`` it starts a mesh in this process (``--mesh disaggregated`` with
``--prefill``/``--decode`` workers, or ``--mesh colocated``) and stops it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
from pathlib import Path
from typing import Any

import grpc

from engine.args import add_engine_args, engine_config_from
from pdmesh.bench import plots
from pdmesh.bench.arrivals import arrival_offsets
from pdmesh.bench.env import environment, write_json
from pdmesh.bench.meshes import recorded_config, serving
from pdmesh.bench.runner import LoadShape, run_load, run_load_processes
from pdmesh.bench.stats import SLO, RequestResult, report
from pdmesh.bench.workload import DISTRIBUTIONS, BenchRequest, WorkloadSpec, make_workload
from pdmesh.mesh import MeshConfig
from pdmesh.v1 import generation_pb2 as gen_pb
from pdmesh.v1 import generation_pb2_grpc as gen_grpc


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload")
    group.add_argument("--workload", choices=[*DISTRIBUTIONS, "jsonl"], default="sharegpt")
    group.add_argument("--dataset", help="JSONL of prompts (with --workload jsonl)")
    group.add_argument("--num-requests", type=int, default=32)
    group.add_argument("--seed", type=int, default=0, help="workload and arrivals seed")
    group.add_argument("--length-scale", type=float, default=1.0, help="scale all lengths")
    group.add_argument("--input-len", type=int, help="fixed prompt length (tokens)")
    group.add_argument("--output-len", type=int, help="fixed output length (tokens)")
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")


def add_slo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slo-ttft-ms", type=float, help="TTFT objective for goodput")
    parser.add_argument("--slo-tpot-ms", type=float, help="TPOT objective for goodput")


def add_target_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", help="HOST:PORT of a running gateway (default: start one)")
    add_engine_args(parser.add_argument_group("started mesh's engines"))  # type: ignore[arg-type]
    parser.add_argument("--store", default="embedded", help="started mesh's KV store")
    parser.add_argument(
        "--gateway-processes", type=int, default=1, help="started mesh's gateway processes"
    )


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="JSON results file")
    parser.add_argument("--plot-dir", help="where PNG plots go (default: --out's folder)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="requests sent at once (4 tokens) before measuring"
    )
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None)
    progress.add_argument("--no-progress", dest="progress", action="store_false")


def add_args(parser: argparse.ArgumentParser) -> None:
    add_target_args(parser)
    parser.add_argument("--mesh", choices=["disaggregated", "colocated"], default="disaggregated")
    parser.add_argument("--prefill", type=int, default=1, help="prefill (or colocated) workers")
    parser.add_argument("--decode", type=int, default=1, help="decode workers")
    load = parser.add_mutually_exclusive_group()
    load.add_argument(
        "--request-rate", type=float, nargs="+", help="requests/s, open loop (inf: all at once)"
    )
    load.add_argument("--concurrency", type=int, nargs="+", help="requests in flight, closed loop")
    parser.add_argument("--burstiness", type=float, default=1.0, help="1 = Poisson; <1 burstier")
    parser.add_argument(
        "--clients", type=int, default=1, help="load-generator processes sharing the load"
    )
    add_workload_args(parser)
    add_slo_args(parser)
    add_output_args(parser)


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    return WorkloadSpec(
        name=args.workload,
        num_requests=args.num_requests,
        seed=args.seed,
        length_scale=args.length_scale,
        input_len=args.input_len,
        output_len=args.output_len,
        path=args.dataset,
    )


def mesh_config(args: argparse.Namespace, mode: str, prefill: int, decode: int) -> MeshConfig:
    return MeshConfig(
        engine=engine_config_from(args),
        gateway_port=0,
        num_prefill=prefill,
        num_decode=decode if mode == "disaggregated" else 0,
        colocated=mode == "colocated",
        store=args.store,
        gateway_processes=args.gateway_processes,
    )


def model_info(target: str) -> gen_pb.ModelInfoResponse:
    with grpc.insecure_channel(target) as channel:
        return gen_grpc.GenerationStub(channel).ModelInfo(gen_pb.ModelInfoRequest(), timeout=30)


def request_rows(results: list[RequestResult]) -> list[dict[str, Any]]:
    return [
        {
            "success": r.success,
            "error": r.error,
            "prompt_len": r.prompt_len,
            "output_len": r.output_len,
            "ttft_ms": r.ttft_s * 1e3 if r.success else None,
            "tpot_ms": r.tpot_s * 1e3 if r.success and r.output_len > 1 else None,
            "e2e_ms": r.e2e_s * 1e3 if r.success else None,
        }
        for r in results
    ]


def shapes(
    args: argparse.Namespace, num_requests: int
) -> list[tuple[str, dict[str, Any], LoadShape]]:
    """(label, JSON fields, load shape) per measured point."""
    if args.concurrency:
        return [
            (f"concurrency {c}", {"concurrency": c}, LoadShape(concurrency=c))
            for c in args.concurrency
        ]
    points = []
    for rate in args.request_rate or [math.inf]:
        offsets = arrival_offsets(num_requests, rate, args.burstiness, args.seed)
        fields = {"request_rate": rate, "burstiness": args.burstiness}
        points.append((f"{rate:g} req/s", fields, LoadShape(arrival_offsets=tuple(offsets))))
    return points


def run_points(
    target: str, requests: list[BenchRequest], args: argparse.Namespace, name: str = ""
) -> list[dict[str, Any]]:
    """Every load point against ``target``: one report per point, printed as it finishes."""
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms)
    if args.warmup:
        warm = [dataclasses.replace(r, max_tokens=min(r.max_tokens, 4)) for r in requests]
        # All at once: the server compiles and tunes for the batch shapes it is measured at.
        shape = LoadShape(concurrency=args.warmup)
        asyncio.run(run_load(target, warm[: args.warmup], shape, progress=False))
    runs = []
    for label, fields, shape in shapes(args, len(requests)):
        label = f"{name} {label}".strip()
        # Clients in processes of their own: one Python cannot read 500 streams at speed.
        if getattr(args, "clients", 1) > 1:
            results, duration = run_load_processes(
                target, requests, shape, args.temperature, args.timeout, args.clients
            )
        else:
            results, duration = asyncio.run(
                run_load(
                    target, requests, shape, args.temperature, args.timeout, label, args.progress
                )
            )
        run = {"label": label, **fields, **report(results, duration, slo)}
        print_run(run)
        runs.append({**run, "requests": request_rows(results)})
    return runs


def print_run(run: dict[str, Any]) -> None:
    ttft, tpot, e2e = run["ttft_ms"], run["tpot_ms"], run["e2e_ms"]
    print(
        f"{run['label']}: {run['completed']}/{run['num_requests']} ok in {run['duration_s']:.1f} s,"
        f" {run['request_throughput']:.2f} req/s, {run['output_token_throughput']:.1f} tok/s;"
        f" TTFT p50 {ttft['p50']:.0f} p99 {ttft['p99']:.0f} ms; TPOT p50 {tpot['p50']:.0f}"
        f" p99 {tpot['p99']:.0f} ms; e2e p50 {e2e['p50']:.0f} ms;"
        f" SLO attainment {100 * run['slo_attainment']:.0f}%, goodput {run['goodput']:.2f} req/s",
        flush=True,
    )


def plot_dir(args: argparse.Namespace) -> str:
    return args.plot_dir or (str(Path(args.out).parent) if args.out else ".")


def output_stem(args: argparse.Namespace, default: str) -> str:
    return Path(args.out).stem if args.out else default


def main(args: argparse.Namespace) -> int:
    spec = workload_spec(args)
    config = mesh_config(args, args.mesh, args.prefill, args.decode)
    with serving(args.target, config) as target:
        info = model_info(target)
        requests = make_workload(spec, info.vocab_size, info.max_model_len)
        runs = run_points(target, requests, args)
    stem, folder = output_stem(args, "serve"), plot_dir(args)
    files = []
    if plots.available():
        title = f"pdmesh {info.model}"
        files.append(plots.latency_cdfs(runs, f"{folder}/{stem}_latency_cdf.png", title))
        if args.request_rate and len(runs) > 1:
            path = f"{folder}/{stem}_slo.png"
            files.append(plots.slo_vs_rate({args.mesh: runs}, path, slo_title(args)))
    write_json(
        args.out,
        {
            "benchmark": "serve",
            **environment(getattr(args, "argv", None)),
            "target": args.target or f"in-process {args.mesh} mesh",
            "mesh": None if args.target else recorded_config(config),
            "model": info.model,
            "workload": dataclasses.asdict(spec),
            "plots": files,
            "runs": runs,
        },
    )
    return 0


def slo_title(args: argparse.Namespace) -> str:
    return f"SLO: TTFT <= {args.slo_ttft_ms:g} ms, TPOT <= {args.slo_tpot_ms:g} ms"
