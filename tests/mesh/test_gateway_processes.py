"""`pdmesh up --gateway-processes 2`: two gateway processes share the gRPC and HTTP ports
(the kernel spreads connections over them), both serve, outputs are the engine's, and an
Abort that reaches the process not running the request still ends it. Both name the model
``--served-model-name`` on the HTTP port."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from pdmesh.v1 import generation_pb2 as gen_pb
from pdmesh.v1 import generation_pb2_grpc as gen_grpc

KEY = "gateway-processes-test-key"
AUTH = (("authorization", f"Bearer {KEY}"),)
CONNECTIONS = 12
SERVED_NAME = "smol-served"


@dataclass
class Up:
    process: subprocess.Popen[str]
    address: str = ""
    http: str = ""
    metrics: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def up() -> Iterator[Up]:
    command = [sys.executable, "-m", "pdmesh.cli", "up", "--device", "cpu", "--colocated"]
    command += ["--gateway-processes", "2", "--port", "0", "--metrics-port", "0"]
    command += ["--http-port", "0", "--api-key", KEY, "--served-model-name", SERVED_NAME]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    started = Up(process)
    try:
        deadline = time.monotonic() + 300
        assert process.stdout is not None
        while not started.address and time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line, "pdmesh up exited before listening"
            if match := re.search(r"\[(gateway(?:-\d+)?)\] pdmesh: metrics on (\S+)", line):
                started.metrics[match.group(1)] = match.group(2)
            if match := re.search(r"\[gateway\] pdmesh: OpenAI API on (\S+)", line):
                started.http = match.group(1)
            if match := re.search(r"gateway listening on (\S+) .*3 service processes", line):
                started.address = match.group(1)
        assert started.address and started.http, "no summary line"
        threading.Thread(target=process.stdout.read, daemon=True).start()  # keep it unblocked
        yield started
    finally:
        process.terminate()
        try:
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()


def _finished(metrics_url: str) -> float:
    return sum(_count(metrics_url, status) for status in ("stop", "length", "abort", "error"))


def test_both_processes_serve_one_port_with_the_engines_outputs(up: Up, smol_llm: LLM) -> None:
    assert set(up.metrics) == {"gateway", "gateway-1"}
    prompt = "The capital of France is"
    want = smol_llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0))[0]
    request = gen_pb.GenerateRequest(prompt=prompt, max_tokens=6, temperature=0)
    for _ in range(CONNECTIONS):
        with _connection(up.address) as channel:
            reply = gen_grpc.GenerationStub(channel).GenerateUnary(
                request, metadata=AUTH, timeout=120
            )
        assert list(reply.token_ids) == want.token_ids and reply.text == want.text
    served = {name: _finished(url) for name, url in up.metrics.items()}
    assert sum(served.values()) == CONNECTIONS
    assert all(count > 0 for count in served.values()), served  # both took connections
    for _ in range(8):  # the HTTP port is shared too
        health = urllib.request.urlopen(up.http.removesuffix("/v1") + "/health", timeout=10)
        assert health.status == 200
        models = urllib.request.Request(
            f"{up.http}/models", headers={"Authorization": f"Bearer {KEY}"}
        )
        with urllib.request.urlopen(models, timeout=10) as reply:
            assert [m["id"] for m in json.load(reply)["data"]] == [SERVED_NAME]


def _connection(address: str) -> grpc.Channel:
    """A channel with a connection of its own (gRPC shares one between equal channels)."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def _running(up: Up) -> dict[str, float]:
    return {name: _count(url, "running") for name, url in up.metrics.items()}


def test_an_abort_from_another_connection_ends_requests_on_either_process(up: Up) -> None:
    channels: list[grpc.Channel] = []
    streams: dict[str, Any] = {}
    try:
        # New connections, one request each, until both processes run some (the kernel
        # picks the process of a connection); any one connection then lands on a process
        # that does not run all of them.
        while min(_running(up).values()) == 0:
            assert len(streams) < 40, f"every connection went to one process: {_running(up)}"
            request_id = f"long-{len(streams)}"
            channels.append(_connection(up.address))
            request = gen_pb.GenerateRequest(
                request_id=request_id, prompt="Tell me a long story.", max_tokens=400,
                ignore_eos=True,
            )  # fmt: skip
            stub = gen_grpc.GenerationStub(channels[-1])
            streams[request_id] = stub.Generate(request, metadata=AUTH, timeout=120)
            next(streams[request_id])  # running
        with _connection(up.address) as channel:
            stub = gen_grpc.GenerationStub(channel)
            for request_id in streams:
                answer = stub.Abort(
                    gen_pb.AbortRequest(request_id=request_id), metadata=AUTH, timeout=10
                )
                assert answer.aborted, request_id
            unknown = stub.Abort(gen_pb.AbortRequest(request_id="never-sent"), metadata=AUTH)
            assert not unknown.aborted
        for stream in streams.values():
            pieces = list(stream)
            assert pieces[-1].finish_reason == gen_pb.FINISH_REASON_ABORT
            assert sum(len(p.token_ids) for p in pieces) < 400
    finally:
        for channel in channels:
            channel.close()
    aborts = {name: _count(url, "abort") for name, url in up.metrics.items()}
    assert sum(aborts.values()) == len(streams) and min(aborts.values()) > 0, aborts


def _count(metrics_url: str, status: str) -> float:
    """Requests finished with ``status``, or ("running") in flight, at one gateway."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    line = (
        r"^pdmesh_num_requests_running (\S+)$"
        if status == "running"
        else rf'^pdmesh_requests_total\{{status="{status}"\}} (\S+)$'
    )
    found = re.search(line, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0
