"""`pdmesh up` as a user runs it: a separate process that prints where it listens, serves,
and on SIGTERM (or Ctrl-C, the same handler) drains: health turns NOT_SERVING, new requests
get UNAVAILABLE, the request in flight still completes, then the process exits 0. Its
OpenAI HTTP API (``--port 0``: a free port too) names the model by its file and follows the
same health."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.model_source import default_model_path
from pdmesh.v1 import generation_pb2 as gen_pb
from pdmesh.v1 import generation_pb2_grpc as gen_grpc

GATEWAY = "pdmesh.v1.Generation"


def _health(channel: grpc.Channel) -> Any:
    request = health_pb2.HealthCheckRequest(service=GATEWAY)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


def _http_health(base: str) -> int:
    return httpx.get(f"{base}/health", timeout=10).status_code


def test_pdmesh_up_serves_and_drains_on_sigterm() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "pdmesh.cli", "up", "--device", "cpu", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        address = base = None
        deadline = time.monotonic() + 240
        assert process.stdout is not None
        while address is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line, "pdmesh up exited before listening"
            if match := re.search(r"OpenAI API on (http://\S+)/v1", line):
                base = match.group(1)
            match = re.search(r"gateway listening on (\S+)", line)
            address = match.group(1) if match else None
        assert address is not None and base is not None
        assert _http_health(base) == 200
        models = httpx.get(f"{base}/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in models] == [default_model_path().name]
        with grpc.insecure_channel(address) as channel:
            assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
            stub = gen_grpc.GenerationStub(channel)
            reply = stub.GenerateUnary(
                gen_pb.GenerateRequest(
                    prompt="The capital of France is", max_tokens=4, temperature=0
                ),
                timeout=120,
            )
            assert "Paris" in reply.text and reply.usage.completion_tokens == 4
            # A long request is running when SIGTERM comes: it must still complete.
            in_flight = stub.Generate(
                gen_pb.GenerateRequest(prompt="Tell me a story.", max_tokens=80, ignore_eos=True),
                timeout=120,
            )
            pieces = [next(in_flight)]
            rest = threading.Thread(target=lambda: pieces.extend(in_flight))
            rest.start()
            process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while _health(channel) != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "health never turned NOT_SERVING"
                time.sleep(0.05)
            assert _http_health(base) == 503
            late = httpx.post(f"{base}/v1/completions", json={"prompt": "late"}, timeout=30)
            assert late.status_code == 503 and late.json()["error"]["code"] == "unavailable"
            try:
                stub.GenerateUnary(gen_pb.GenerateRequest(prompt="late"), timeout=30)
                raise AssertionError("a request was accepted while draining")
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE
            rest.join(timeout=120)
            assert pieces[-1].finish_reason == gen_pb.FINISH_REASON_LENGTH
            assert pieces[-1].usage.completion_tokens == 80
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
