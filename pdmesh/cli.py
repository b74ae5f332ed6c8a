"""The ``pdmesh`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from engine.args import add_engine_args, engine_config_from
from engine.errors import PdmeshError
from engine.sampling_params import SamplingParams
from pdmesh.security_args import add_client_security_args, add_security_args, security_config_from
from serving.convert import sampling_params

#: The sampling flags of ``pdmesh generate``, named like SamplingParams' fields: type, default
#: (None: unset), help.
SAMPLING_FLAGS: dict[str, tuple[type, Any, str | None]] = {
    "max_tokens": (int, 128, None),
    "temperature": (float, 0.0, "0 = greedy (default)"),
    "top_p": (float, 1.0, None),
    "top_k": (int, 0, None),
    "min_p": (float, 0.0, None),
    "repetition_penalty": (float, 1.0, None),
    "seed": (int, None, None),
}


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    for name, (kind, default, text) in SAMPLING_FLAGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=text)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")


def sampling_params_from(args: argparse.Namespace) -> SamplingParams:
    names = [*SAMPLING_FLAGS, "stop", "ignore_eos"]
    return sampling_params({name: getattr(args, name) for name in names})


def cmd_generate(args: argparse.Namespace) -> int:
    if args.target:
        from pdmesh.client import stream_generate
        from pdmesh.security_args import client_security_from

        security = client_security_from(args)
        params = sampling_params_from(args)
        return stream_generate(args.target, args.prompt, args.chat, params, security)
    from engine.llm import LLM

    params = sampling_params_from(args)  # validate before loading the model
    llm = LLM(engine_config_from(args))
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    for delta in llm.stream(prompt, params):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdmesh", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate text offline, streamed to stdout")
    generate.add_argument("prompt")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt as a user message")
    generate.add_argument("--target", help="HOST:PORT of a gateway (default: run offline)")
    add_client_security_args(generate)
    add_engine_args(generate)
    add_sampling_args(generate)
    generate.set_defaults(func=cmd_generate)

    up = commands.add_parser("up", help="run the whole mesh locally (gateway on --port)")
    add_engine_args(up)
    add_mesh_args(up)
    add_security_args(up)
    up.add_argument(
        "--worker-host", default="127.0.0.1", help="workers' listen address (default loopback)"
    )
    up.add_argument("--prefill", type=int, default=1, help="prefill workers")
    up.add_argument("--decode", type=int, default=1, help="decode workers")
    up.add_argument("--prefill-tp", type=int, default=1, help="ranks per prefill worker")
    up.add_argument("--decode-tp", type=int, default=1, help="ranks per decode worker")
    for role in ("prefill", "decode"):
        up.add_argument(
            f"--{role}-devices",
            type=device_list,
            help=f"GPUs of the {role} workers, e.g. 0 or 0,1 (default: the engine's device; "
            "workers on one GPU split --gpu-memory-utilization)",
        )
    up.add_argument(
        "--colocated",
        action="store_true",
        help="each of --prefill workers runs whole requests (no disaggregation)",
    )
    up.set_defaults(func=cmd_up)

    serve = commands.add_parser("serve", help="run one service (what a container runs)")
    serve.add_argument("role", choices=["gateway", "prefill", "decode", "colocated"])
    add_engine_args(serve)
    add_mesh_args(serve)
    add_security_args(serve)
    serve.add_argument("--prefill-addr", action="append", default=[], help="gateway: worker")
    serve.add_argument("--decode-addr", action="append", default=[], help="gateway: worker")
    serve.add_argument("--colocated-addr", action="append", default=[], help="gateway: worker")
    serve.set_defaults(func=cmd_serve)

    from pdmesh.bench.cli import add_bench_parser

    add_bench_parser(commands)
    return parser


def device_list(text: str) -> tuple[int, ...]:
    try:
        devices = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"GPU indexes like 0 or 0,1, got {text!r}") from None
    if not devices or min(devices) < 0:
        raise argparse.ArgumentTypeError(f"GPU indexes like 0 or 0,1, got {text!r}")
    return devices


def add_mesh_args(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--host", default=env("PDMESH_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("PDMESH_PORT", "50051")))
    parser.add_argument(
        "--store",
        default=env("PDMESH_STORE", "embedded"),
        help="embedded | redis://HOST:PORT/DB | redis+shm://HOST:PORT/DB; "
        "up: bare 'redis' or 'redis+shm' starts a private redis-server",
    )
    parser.add_argument("--store-capacity-blocks", type=int, default=8192)
    parser.add_argument(
        "--http-port",
        type=int,
        help="gateway: OpenAI-compatible HTTP API port on --host; default $PDMESH_HTTP_PORT "
        "or 8080 (a free port when --port is 0); -1 = off",
    )
    parser.add_argument(
        "--gateway-processes",
        type=int,
        default=int(env("PDMESH_GATEWAY_PROCESSES", "1")),
        help="gateway: processes sharing --port and --http-port (the kernel spreads "
        "connections; each has its share of --max-in-flight and its own metrics port). One "
        "streams about 20k tokens/s; like vLLM's --api-server-count",
    )
    parser.add_argument(
        "--served-model-name",
        default=env("PDMESH_SERVED_MODEL_NAME"),
        help="gateway: the model name of the HTTP API (default: the model's file name)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="first Prometheus /metrics HTTP port (up: workers take the next ones); "
        "default $PDMESH_METRICS_PORT or 8000 (free ports when --port is 0); 0 = free "
        "ports, -1 = off",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=env("PDMESH_LOG_FORMAT", "text"),
        help="json: one JSON object per line, with the request id",
    )
    # Overload bounds and drain (pdmesh/limits.py): unset flags fall back to PDMESH_* variables.
    parser.add_argument(
        "--max-in-flight",
        type=int,
        help="gateway: requests at once, more get RESOURCE_EXHAUSTED (1024; PDMESH_MAX_IN_FLIGHT)",
    )
    parser.add_argument(
        "--max-waiting",
        type=int,
        help="worker: queued requests, more get RESOURCE_EXHAUSTED (256, at least --max-num-seqs; "
        "PDMESH_MAX_WAITING)",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        help="gateway: largest request message (4 MiB; PDMESH_MAX_REQUEST_BYTES)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        help="seconds running requests get on SIGTERM (30; PDMESH_DRAIN_TIMEOUT_S)",
    )


def cmd_up(args: argparse.Namespace) -> int:
    from pdmesh.launch import run_up

    return run_up(args, engine_config_from(args), security_config_from(args))


def cmd_serve(args: argparse.Namespace) -> int:
    from pdmesh.launch import run_serve

    return run_serve(args, engine_config_from(args), security_config_from(args))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # benchmarks record their command
    try:
        return int(args.func(args))
    except (PdmeshError, ValueError, FileNotFoundError) as error:
        print(f"pdmesh: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
