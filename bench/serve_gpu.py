"""Served tok/s next to the engine's own, in one run on one GPU (issue 14's table).

For each batch B: the offline engine (``pdmesh bench batch``, one wave of B requests) and the
same load through the real serving path (``pdmesh bench serve --target`` in processes of its
own, closed loop at concurrency B, B requests) for each layout:

  a. ``pdmesh up --colocated``                   gateway + one colocated worker
  b. ``pdmesh up`` (1 prefill + 1 decode)        both workers time-slice one GPU
  c. ``pdmesh serve colocated`` + ``serve gateway``, separate processes

Every service is a subprocess started here; the load generator never shares a process with
the mesh. Model: a Llama-3.1-8B shape (dummy bf16 weights) with a synthetic 128k-entry
tokenizer, or the default model's 135M shape the same way. Prints served/offline and
TTFT/TPOT percentiles.

    python -m bench.serve_gpu --shape 8b --batches 64 256 512 --out bench/results/serve_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from bench.common import environment, write_json
from bench.engine_gpu import shape_dir
from bench.proc_cpu import PeakSampler

LAYOUTS = {
    "a_up_colocated": ["up", "--colocated"],
    "b_up_shared_gpu": ["up", "--prefill", "1", "--decode", "1"],
    "c_serve_processes": [],
}
CLI = [sys.executable, "-m", "pdmesh.cli"]


def engine_flags(model: str | None, batch: int, args: argparse.Namespace) -> list[str]:
    flags = ["--device", args.device, "--max-num-seqs", str(batch), "--max-model-len", "512"]
    flags += ["--max-num-batched-tokens", str(args.batched_tokens)]
    flags += ["--gateway-processes", str(getattr(args, "gateway_processes", 1))]
    return flags + (["--model", model, "--load-format", "dummy"] if model else [])


def offline(model: str | None, args: argparse.Namespace, out: Path) -> dict[int, dict[str, Any]]:
    command = [*CLI, "bench", "batch", "--device", args.device, "--input-len", str(args.input_len)]
    command += ["--new-tokens", str(args.output_len), "--batch-sizes", *map(str, args.batches)]
    command += ["--max-num-batched-tokens", str(args.batched_tokens)]  # as the served engine
    command += ["--out", str(out)] + (["--model", model, "--load-format", "dummy"] if model else [])
    subprocess.run(command, check=True, timeout=900)
    rows = json.loads(out.read_text())["results"]
    return {row["batch"]: row for row in rows if not row.get("oom")}


def start_services(
    layout: str, flags: list[str], port: int, log: Path
) -> list[subprocess.Popen[bytes]]:
    common = (
        ["--metrics-port", "-1", "--http-port", "-1"]
        if _has_http_flag()
        else ["--metrics-port", "-1"]
    )
    handle = open(log, "ab")  # noqa: SIM115 - closed with the process
    start = lambda argv: subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT)  # noqa: E731
    if layout != "c_serve_processes":
        return [start([*CLI, *LAYOUTS[layout], "--port", str(port), *flags, *common])]
    secret = os.urandom(16).hex()
    env_flags = ["--mesh-secret-file", _secret_file(secret)]
    worker = start(
        [*CLI, "serve", "colocated", "--port", str(port + 1), *flags, *common, *env_flags]
    )
    gateway = start(
        [*CLI, "serve", "gateway", "--port", str(port), "--colocated-addr", f"127.0.0.1:{port + 1}",
         *flags, *common, *env_flags]
    )  # fmt: skip
    return [worker, gateway]


def _has_http_flag() -> bool:
    help_text = subprocess.run([*CLI, "up", "--help"], capture_output=True, text=True).stdout
    return "--http-port" in help_text


def _secret_file(secret: str) -> str:
    handle = tempfile.NamedTemporaryFile("w", suffix=".secret", delete=False)  # noqa: SIM115
    handle.write(secret)
    handle.close()
    return handle.name


#: What the launcher prints once every gateway process serves (``up``, ``serve gateway``).
READY = re.compile(r"gateway (processes )?listening on")


def wait_ready(
    address: str, processes: list[subprocess.Popen[bytes]], timeout: float, log: Path
) -> None:
    """Until the launcher says every gateway process serves and ModelInfo answers."""
    from pdmesh.v1 import generation_pb2 as gen_pb
    from pdmesh.v1 import generation_pb2_grpc as gen_grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            raise RuntimeError("a service exited while starting (see the log)")
        if not READY.search(log.read_text(errors="replace")):
            time.sleep(1)
            continue
        try:
            with grpc.insecure_channel(address) as channel:
                gen_grpc.GenerationStub(channel).ModelInfo(gen_pb.ModelInfoRequest(), timeout=2)
            return
        except grpc.RpcError:
            time.sleep(1)
    raise TimeoutError(f"{address} not serving after {timeout:.0f} s")


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in reversed(processes):
        process.send_signal(signal.SIGINT)
    for process in processes:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def served(
    address: str, batch: int, args: argparse.Namespace, out: Path,
    services: list[subprocess.Popen[bytes]],
) -> dict[str, Any]:  # fmt: skip
    """One closed-loop run at concurrency ``batch``; with each service process's busiest
    second of CPU (which one is the bottleneck). The load generator's are recorded apart:
    its busiest second is usually its own start-up."""
    command = [*CLI, "bench", "serve", "--target", address, "--concurrency", str(batch)]
    command += ["--num-requests", str(batch), "--input-len", str(args.input_len)]
    command += ["--output-len", str(args.output_len), "--warmup", str(batch)]  # a full wave
    command += ["--clients", str(args.clients), "--no-progress", "--out", str(out)]
    generator = subprocess.Popen(command)
    with PeakSampler([s.pid for s in services]) as mesh, PeakSampler([generator.pid]) as load:
        if generator.wait(timeout=900):
            raise RuntimeError(f"bench serve exited with {generator.returncode}")
    run = {k: v for k, v in json.loads(out.read_text())["runs"][0].items() if k != "requests"}
    return {**run, "service_cpu_peaks": mesh.peaks(), "load_cpu_peaks": load.peaks()[:4]}


def layout_rows(
    layout: str, model: str | None, engine: dict[int, dict[str, Any]], args: argparse.Namespace,
    work: Path,
) -> list[dict[str, Any]]:  # fmt: skip
    largest = max(args.batches)
    processes = start_services(
        layout, engine_flags(model, largest, args), args.port, work / f"{layout}.log"
    )
    rows = []
    try:
        wait_ready(f"127.0.0.1:{args.port}", processes, 600, work / f"{layout}.log")
        for batch in args.batches:
            address = f"127.0.0.1:{args.port}"
            run = served(address, batch, args, work / f"{layout}_{batch}.json", processes)
            offline_row = engine.get(batch, {})
            offline_tps = offline_row.get("tokens_per_s")
            step_ms = offline_row.get("wall_s", 0) * 1e3 / args.output_len
            row = {
                "layout": layout, "batch": batch, "served_tok_s": run["output_token_throughput"],
                "offline_tok_s": offline_tps, "engine_ms_per_step": step_ms,
                "ratio": run["output_token_throughput"] / offline_tps if offline_tps else None,
                "ttft_ms": run["ttft_ms"], "tpot_ms": run["tpot_ms"], "completed": run["completed"],
                "errors": run.get("errors", {}), "service_cpu_peaks": run["service_cpu_peaks"],
                "load_cpu_peaks": run["load_cpu_peaks"],
            }  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        stop(processes)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=["8b", "70b", "135m"], default="8b")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--batched-tokens", type=int, default=8192)
    parser.add_argument("--clients", type=int, default=8, help="load-generator processes")
    parser.add_argument(
        "--gateway-processes", type=int, default=4, help="gateway processes on the one port"
    )
    parser.add_argument("--port", type=int, default=56100)
    parser.add_argument("--work-dir", help="logs and per-run JSON (default: a temp dir)")
    parser.add_argument("--out")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="serve-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    model = shape_dir(args.shape, work / "model")
    engine = offline(model, args, work / "offline.json")
    rows = []
    for layout in args.layouts:
        try:
            rows += layout_rows(layout, model, engine, args, work)
        except Exception as error:  # report the others; the log says why
            print(f"{layout} failed: {error}", flush=True)
            rows.append({"layout": layout, "error": str(error)})
    write_json(args.out, {
        "benchmark": "served vs offline tok/s", "shape": args.shape, "environment": environment(),
        "command": " ".join(sys.argv), "offline": engine, "rows": rows,
    })  # fmt: skip


if __name__ == "__main__":
    main()
