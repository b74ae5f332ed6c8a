"""The same closed-loop load through the gateway's OpenAI HTTP API and through its gRPC API,
in one run against one mesh: output tok/s, TTFT and TPOT side by side (issue 17: HTTP
within 10% of gRPC at concurrency 64).

The mesh is ``pdmesh up`` in a subprocess (``--colocated`` by default: one GPU), serving
both APIs from one gateway; the load generators are processes of their own (``--clients``),
the gRPC one as ``pdmesh bench serve --clients`` runs it, the HTTP one streaming
``/v1/completions`` with the same token-id prompts, lengths and ``ignore_eos``.

    python -m bench.http_vs_grpc_gpu --shape 8b --concurrency 64 256 \\
        --out bench/results/http_vs_grpc_h200.json
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
from bench.serve_gpu import CLI, shape_dir, stop, wait_ready
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


def side_by_side(grpc_run: dict, http_run: dict) -> dict[str, Any]:
    def ratio(key: str, stat: str | None = None) -> float | None:
        g, h = grpc_run[key], http_run[key]
        g, h = (g[stat], h[stat]) if stat else (g, h)
        return h / g if g else None

    return {
        "concurrency": grpc_run["concurrency"],
        "grpc_tok_s": grpc_run["output_token_throughput"],
        "http_tok_s": http_run["output_token_throughput"],
        "http_over_grpc_tok_s": ratio("output_token_throughput"),
        "grpc_ttft_p50_ms": grpc_run["ttft_ms"]["p50"],
        "http_ttft_p50_ms": http_run["ttft_ms"]["p50"],
        "grpc_tpot_p50_ms": grpc_run["tpot_ms"]["p50"],
        "http_tpot_p50_ms": http_run["tpot_ms"]["p50"],
        "http_over_grpc_tpot_p50": ratio("tpot_ms", "p50"),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=["8b", "70b", "135m"], default="8b")
    parser.add_argument("--layout", choices=list(LAYOUTS), default="colocated")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64])
    parser.add_argument("--requests-per-client-slot", type=int, default=2,
                        help="requests per concurrency slot (closed loop)")  # fmt: skip
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--clients", type=int, default=8, help="load-generator processes")
    parser.add_argument("--port", type=int, default=56200)
    parser.add_argument("--http-port", type=int, default=56280)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--work-dir", help="the mesh's log (default: a temp dir)")
    parser.add_argument("--out")
    args = parser.parse_args()
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
            requests = workload(args, concurrency * args.requests_per_client_slot)
            pair = [measure(p, requests, concurrency, args) for p in ("grpc", "http")]
            runs += pair
            rows.append(side_by_side(*pair))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        stop(processes)
    write_json(args.out, {
        "benchmark": "http vs grpc, same closed-loop load", "shape": args.shape,
        "layout": args.layout, "environment": environment(), "command": " ".join(sys.argv),
        "input_len": args.input_len, "output_len": args.output_len, "clients": args.clients,
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
