"""What authentication costs per internal call: the same tiny unary and server-streaming RPCs
over a plaintext channel, with the mesh secret (client interceptor + server interceptor), and
with the mesh secret over mutual TLS. The variants take turns, round by round, in one run.

    python -m bench.auth_overhead [--calls 300] [--rounds 5] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from gateway.router import CHANNEL_OPTIONS, plaintext_channel
from serving.auth import worker_channel, worker_interceptors
from serving.rpc import Server
from serving.security import SecurityConfig
from tests.mesh.certs import issue, make_ca

SERVICE = "bench.Ping"
STREAM_MESSAGES = 16
SECRET = "bench-mesh-secret-0123456789abcdef"


def ping_handlers() -> grpc.GenericRpcHandler:
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for _ in range(STREAM_MESSAGES):
            yield request

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )


async def start(security: SecurityConfig | None) -> Server:
    interceptors = worker_interceptors(security) if security else []
    credentials = security.mesh_server_credentials() if security else None
    server = Server("127.0.0.1:0", [SERVICE], interceptors, credentials)
    server.server.add_generic_rpc_handlers((ping_handlers(),))
    await server.start()
    return server


async def time_calls(channel: grpc.aio.Channel, calls: int) -> tuple[list[float], list[float]]:
    unary = channel.unary_unary(f"/{SERVICE}/Unary")
    stream = channel.unary_stream(f"/{SERVICE}/Stream")
    unary_s, stream_s = [], []
    for _ in range(calls):
        begin = time.perf_counter()
        await unary(b"x" * 64)
        unary_s.append(time.perf_counter() - begin)
        begin = time.perf_counter()
        call, received = stream(b"x" * 64), 0
        while await call.read() is not grpc.aio.EOF:  # as the gateway reads decode streams
            received += 1
        stream_s.append(time.perf_counter() - begin)
        assert received == STREAM_MESSAGES
    return unary_s, stream_s


async def run(calls: int, rounds: int, directory: Path) -> dict[str, Any]:
    mesh = issue(directory, "mesh", make_ca(directory, "mesh-ca"))
    secret_only = SecurityConfig(mesh_secret=SECRET)
    mutual_tls = SecurityConfig(
        mesh_secret=SECRET, mesh_tls_cert=mesh.cert, mesh_tls_key=mesh.key, mesh_tls_ca=mesh.ca
    )
    variants: dict[str, SecurityConfig | None] = {
        "plaintext, no auth": None,
        "mesh secret": secret_only,
        "mesh secret + mutual TLS": mutual_tls,
    }
    servers, channels = {}, {}
    for name, security in variants.items():
        servers[name] = await start(security)
        address = f"127.0.0.1:{servers[name].port}"
        channels[name] = (
            worker_channel(address, CHANNEL_OPTIONS, security)
            if security
            else plaintext_channel(address, CHANNEL_OPTIONS)
        )
    samples: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in variants}
    for name in variants:  # warm-up: connections and TLS handshakes
        await time_calls(channels[name], 20)
    for _ in range(rounds):
        for name in variants:
            unary_s, stream_s = await time_calls(channels[name], calls)
            samples[name][0].extend(unary_s)
            samples[name][1].extend(stream_s)
    for name in variants:
        await channels[name].close()
        await servers[name].stop(0)
    return {
        name: {
            "unary_median_us": statistics.median(unary) * 1e6,
            "stream_median_us": statistics.median(stream) * 1e6,
            "calls": len(unary),
        }
        for name, (unary, stream) in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        results = asyncio.run(run(args.calls, args.rounds, Path(directory)))
    base = results["plaintext, no auth"]
    print(f"{'variant':<28} {'unary µs':>10} {'ratio':>6} {'stream µs':>10} {'ratio':>6}")
    for name, row in results.items():
        unary, stream = row["unary_median_us"], row["stream_median_us"]
        print(
            f"{name:<28} {unary:>10.0f} {unary / base['unary_median_us']:>6.2f} "
            f"{stream:>10.0f} {stream / base['stream_median_us']:>6.2f}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
