"""Where the serving path spends its CPU: py-spy samples every process of a served run.

Starts one layout of ``bench.serve_gpu`` (its services are subprocesses here), drives it with
``pdmesh bench serve --target`` (load-generator processes of their own) at concurrency
``--batch`` and, once the load is steady, records each service process and its children
(gateway, worker servicer, engine core) with ``py-spy record --subprocesses``. Writes the
raw collapsed stacks and a summary of each process's hottest functions.

    python -m bench.profile_serve --shape 8b --batch 256 --out /tmp/profile
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import time
from pathlib import Path

from bench.engine_gpu import shape_dir
from bench.serve_gpu import CLI, LAYOUTS, engine_flags, start_services, stop, wait_ready


def summarize(raw: Path, top: int) -> str:
    """Per process: samples, then the functions holding most samples (self and total)."""
    own: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    total: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    samples: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        process = frames[0]
        samples[process] += count
        own[process][frames[-1]] += count
        for frame in set(frames[1:]):
            total[process][frame] += count
    lines = []
    for process, count in samples.most_common():
        lines.append(f"== {process[:160]}: {count} busy samples (200 a second at most)")
        lines.append("  self:")
        lines += [f"    {n / count:6.1%} {f}" for f, n in own[process].most_common(top)]
        lines.append("  total:")
        lines += [f"    {n / count:6.1%} {f}" for f, n in total[process].most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=["8b", "70b", "135m"], default="8b")
    parser.add_argument("--layout", choices=list(LAYOUTS), default="a_up_colocated")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--batched-tokens", type=int, default=8192)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--port", type=int, default=56300)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = shape_dir(args.shape, out / "model")
    address = f"127.0.0.1:{args.port}"
    services = start_services(
        args.layout, engine_flags(model, args.batch, args), args.port, out / "services.log"
    )
    try:
        wait_ready(address, services, 600, out / "services.log")
        load = [*CLI, "bench", "serve", "--target", address, "--concurrency", str(args.batch)]
        load += ["--num-requests", str(4 * args.batch), "--input-len", str(args.input_len)]
        load += ["--output-len", str(args.output_len), "--warmup", "4", "--no-progress"]
        load += ["--clients", str(args.clients), "--out", str(out / "served.json")]
        generator = subprocess.Popen(load)
        time.sleep(8)  # past the warm-up and the first wave's prefill
        spy = ["py-spy", "record", "--subprocesses", "--nonblocking", "--function"]
        spy += ["--duration", str(int(args.seconds)), "--rate", "200", "--format", "raw"]
        recorders = [
            subprocess.Popen(
                [*spy, "--pid", str(s.pid), "--output", str(out / f"spy-{i}.txt")],
                stdout=open(out / f"spy-{i}.log", "wb"),  # noqa: SIM115 - py-spy's own messages
                stderr=subprocess.STDOUT,
            )
            for i, s in enumerate(services)
        ]
        for recorder in recorders:
            recorder.wait(timeout=args.seconds + 120)
        generator.wait(timeout=900)
    finally:
        stop(services)
    report = []
    for i in range(len(services)):
        raw = out / f"spy-{i}.txt"
        report.append((out / f"spy-{i}.log").read_text(errors="replace")[-2000:])
        if raw.exists():
            report.append(summarize(raw, args.top))
    served = json.loads((out / "served.json").read_text())["runs"][0]
    summary = {k: served[k] for k in ("output_token_throughput", "ttft_ms", "tpot_ms")}
    report.insert(0, json.dumps(summary))
    (out / "summary.txt").write_text("\n".join(report))
    print("\n".join(report)[:20000])


if __name__ == "__main__":
    main()
