"""The same closed-loop load through the gateway's OpenAI HTTP API and through its gRPC API,
in one run against one mesh: output tok/s, TTFT and TPOT side by side (issue 17: HTTP
within 10% of gRPC at concurrency 64).

The mesh is ``pdmesh up`` in a subprocess (``--colocated`` by default: one GPU), serving
both APIs from the same gateway process(es); the load generators are processes of their own
(``--clients``), the gRPC one as ``pdmesh bench serve --clients`` runs it, the HTTP one
streaming ``/v1/completions`` with the same token-id prompts, lengths and ``ignore_eos``.
Each of ``--rounds`` rounds runs both protocols, in turn first (a mesh warms up and its
caches fill: neither should always run second); a row compares their means and says
whether HTTP is within ``--target`` of gRPC's tok/s.

    python -m bench.http_vs_grpc_gpu --shape 8b --concurrency 64 256 \\
        --out bench/results/http_vs_grpc_h200.json   # bash bench/run_h200.sh http_vs_grpc
    python -m bench.http_vs_grpc_gpu --device cpu --shape 135m --concurrency 4 \\
        --input-len 32 --output-len 16 --clients 2 --out bench/results/http_vs_grpc_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import environment, write_json
from bench.engine_gpu import shape_dir
from bench.serve_gpu import CLI, stop, wait_ready
from pdmesh.bench import http_runner, runner
from pdmesh.bench.runner import LoadShape
from pdmesh.bench.stats import SLO, report
from pdmesh.bench.workload import BenchRequest, WorkloadSpec, make_workload

LAYOUTS = {"colocated": ["up", "--colocated"], "disaggregated": ["up"]}


def start_mesh(model: str | None, args: argparse.Namespace, log: Path) -> list[Any]:
    import subprocess

    flags = ["--device", args.device, "--max-num-seqs", str(max(args.concurrency))]
    flags += ["--max-model-len", str(args.input_len + args.output_len + 16)]
    flags += ["--model", model, "--load-format", "dummy"] if model else []
    command = [*CLI, *LAYOUTS[args.layout], "--port", str(args.port), *flags]
    command += ["--http-port", str(args.http_port), "--metrics-port", "-1"]
    command += ["--gateway-processes", str(args.gateway_processes)]
    handle = open(log, "ab")  # noqa: SIM115 - closed with the process
    return [subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)]


def workload(args: argparse.Namespace, num_requests: int) -> list[BenchRequest]:
    spec = WorkloadSpec(
        name="sharegpt", num_requests=num_requests, seed=args.seed,
        input_len=args.input_len, output_len=args.output_len,
    )  # fmt: skip
    return make_workload(spec, args.vocab_size, args.input_len + args.output_len + 16)


def measure(protocol: str, requests: list[BenchRequest], concurrency: int, args: Any) -> dict:
    shape = LoadShape(concurrency=concurrency)
    if protocol == "grpc":
        results, duration = runner.run_load_processes(
            f"127.0.0.1:{args.port}", requests, shape, 0.0, args.timeout, args.clients
        )
    else:
        results, duration = http_runner.run_load_processes(
            f"http://127.0.0.1:{args.http_port}", requests, shape, 0.0, args.timeout, args.clients
        )
    run = report(results, duration, SLO())
    errors = sorted({r.error for r in results if not r.success})[:3]
    return {"protocol": protocol, "concurrency": concurrency, **run, "errors": errors}


def _mean(runs: list[dict], key: str, stat: str | None = None) -> float:
    values = [run[key][stat] if stat else run[key] for run in runs]
    return sum(values) / len(values)


def side_by_side(grpc_runs: list[dict], http_runs: list[dict], target: float) -> dict[str, Any]:
    """One concurrency's rounds of both protocols: means side by side, HTTP over gRPC."""
    row: dict[str, Any] = {"concurrency": grpc_runs[0]["concurrency"], "rounds": len(grpc_runs)}
    for name, key, stat in (
        ("tok_s", "output_token_throughput", None),
        ("ttft_p50_ms", "ttft_ms", "p50"),
        ("ttft_p90_ms", "ttft_ms", "p90"),
        ("tpot_p50_ms", "tpot_ms", "p50"),
        ("tpot_p90_ms", "tpot_ms", "p90"),
    ):
        grpc_value, http_value = _mean(grpc_runs, key, stat), _mean(http_runs, key, stat)
        row[f"grpc_{name}"], row[f"http_{name}"] = grpc_value, http_value
        row[f"http_over_grpc_{name}"] = http_value / grpc_value if grpc_value else None
    row["failed"] = sum(run["failed"] for run in grpc_runs + http_runs)
    ratio = row["http_over_grpc_tok_s"]
    row["http_within_target"] = ratio is not None and ratio >= 1 - target and not row["failed"]
    return row


def compare(concurrency: int, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """``args.rounds`` rounds of both protocols on one workload; gRPC first in even rounds."""
    requests = workload(args, concurrency * args.requests_per_client_slot)
    runs: dict[str, list[dict]] = {"grpc": [], "http": []}
    for index in range(args.rounds):
        order = ("grpc", "http") if index % 2 == 0 else ("http", "grpc")
        for protocol in order:
            runs[protocol].append(measure(protocol, requests, concurrency, args))
    return side_by_side(runs["grpc"], runs["http"], args.target), runs["grpc"] + runs["http"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=["8b", "70b", "135m"], default="8b")
    parser.add_argument("--layout", choices=list(LAYOUTS), default="colocated")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64])
    parser.add_argument("--requests-per-client-slot", type=int, default=2,
                        help="requests per concurrency slot (closed loop)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both protocols")
    parser.add_argument("--target", type=float, default=0.10,
                        help="HTTP tok/s may trail gRPC's by this fraction")  # fmt: skip
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--clients", type=int, default=8, help="load-generator processes")
    parser.add_argument("--gateway-processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=56200)
    parser.add_argument("--http-port", type=int, default=56280)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--work-dir", help="the mesh's log (default: a temp dir)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.rounds < 1 or not 0 <= args.target < 1:
        parser.error("--rounds must be >= 1 and --target in [0, 1)")
    return args


def main() -> None:
    args = parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="http-vs-grpc-"))
    work.mkdir(parents=True, exist_ok=True)
    model = shape_dir(args.shape, work / "model")
    processes = start_mesh(model, args, work / "mesh.log")
    rows, runs = [], []
    try:
        wait_ready(f"127.0.0.1:{args.port}", processes, 900, work / "mesh.log")
        args.vocab_size = model_vocab(args.port)
        warm = [dataclasses.replace(r, max_tokens=4) for r in workload(args, 4)]
        for protocol in ("grpc", "http"):
            measure(protocol, warm, 2, args)
        for concurrency in args.concurrency:
            row, pair_runs = compare(concurrency, args)
            rows.append(row)
            runs += pair_runs
            print(json.dumps(row), flush=True)
    finally:
        stop(processes)
    write_json(args.out, {
        "benchmark": "http vs grpc, same closed-loop load", "shape": args.shape,
        "layout": args.layout, "environment": environment(), "command": " ".join(sys.argv),
        "input_len": args.input_len, "output_len": args.output_len, "clients": args.clients,
        "gateway_processes": args.gateway_processes, "target": args.target,
        "rows": rows, "runs": runs,
    })  # fmt: skip


def model_vocab(port: int) -> int:
    import grpc

    from pdmesh.v1 import generation_pb2 as gen_pb
    from pdmesh.v1 import generation_pb2_grpc as gen_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        info = gen_grpc.GenerationStub(channel).ModelInfo(gen_pb.ModelInfoRequest(), timeout=30)
    return int(info.vocab_size)


if __name__ == "__main__":
    main()
