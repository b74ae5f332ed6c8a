"""`pdmesh up` as a user runs it: a separate process that prints where it listens, serves, and
stops cleanly on Ctrl-C (SIGINT)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdmesh.v1 import generation_pb2 as gen_pb
from pdmesh.v1 import generation_pb2_grpc as gen_grpc


def test_pdmesh_up_serves_and_stops_on_ctrl_c() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "up", "--device", "cpu", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        address = None
        deadline = time.monotonic() + 240
        assert process.stdout is not None
        while address is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line, "pdmesh up exited before listening"
            match = re.search(r"gateway listening on (\S+)", line)
            address = match.group(1) if match else None
        assert address is not None
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="pdmesh.v1.Generation"), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            reply = gen_grpc.GenerationStub(channel).GenerateUnary(
                gen_pb.GenerateRequest(
                    prompt="The capital of France is", max_tokens=4, temperature=0
                ),
                timeout=120,
            )
            assert "Paris" in reply.text and reply.usage.completion_tokens == 4
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
