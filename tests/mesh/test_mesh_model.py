"""The gateway takes the model, KV namespace and limits from its workers (issue 18).

Separate ``pdmesh serve`` processes, as a deployment runs them: two bfloat16 workers (a
prefill and a decode) and a float32 decode worker, in front of a gateway given no engine
flags at all. The gateway adopts the bfloat16 namespace, serves with the engine's tokens, and
refuses the float32 worker with one log line naming both namespaces (ModelInfo and /metrics
show it); no request meets the mismatch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
import pytest

from engine.config import EngineConfig
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from kvstore.local_redis import start_redis, stop_redis
from pdmesh.v1 import generation_pb2 as gen_pb
from pdmesh.v1 import generation_pb2_grpc as gen_grpc
from pdmesh.v1 import worker_pb2 as worker_pb
from pdmesh.v1 import worker_pb2_grpc as worker_grpc
from serving.auth import bearer_metadata

SECRET = "mesh-model-test-secret"
START_S = 300
PROMPTS = ["The capital of France is", "List three colors:", "Write a haiku about rain."]


@dataclass
class Service:
    process: subprocess.Popen[str]
    log: IO[str]
    address: str = ""
    metrics: str = ""

    def log_text(self) -> str:
        return Path(self.log.name).read_text()


@dataclass
class ServedMesh:
    gateway: Service
    workers: list[Service] = field(default_factory=list)


def _serve(role: str, *flags: str, log_dir: str) -> Service:
    command = [sys.executable, "-m", "pdmesh.cli", "serve", role, "--device", "cpu"]
    command += ["--port", "0", "--metrics-port", "0", *flags]
    env = {**os.environ, "PDMESH_MESH_SECRET": SECRET, "PDMESH_CPU_THREADS": "1"}
    env.pop("PDMESH_DTYPE", None)
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed by _stop)
        "w+", dir=log_dir, suffix=f".{role}.log", delete=False
    )
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    return Service(process, log)


def _wait_listening(service: Service) -> None:
    deadline = time.monotonic() + START_S
    assert service.process.stdout is not None
    while not service.address and time.monotonic() < deadline:
        line = service.process.stdout.readline()
        assert line, f"exited before listening:\n{service.log_text()[-3000:]}"
        if match := re.search(r"metrics on (\S+)", line):
            service.metrics = match.group(1)
        if match := re.search(r"listening on (\S+)", line):
            service.address = match.group(1)
    assert service.address, "never listened"
    threading.Thread(target=service.process.stdout.read, daemon=True).start()


def _stop(service: Service) -> None:
    service.process.terminate()
    try:
        service.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        service.process.kill()
    service.log.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedMesh]:
    redis, url = start_redis()
    store = ["--store", url.replace("redis://", "redis+shm://", 1)]
    logs = str(tmp_path_factory.mktemp("logs"))
    workers = [
        _serve("prefill", "--dtype", "bfloat16", *store, log_dir=logs),
        _serve("decode", "--dtype", "bfloat16", *store, log_dir=logs),
        _serve("decode", "--dtype", "float32", *store, log_dir=logs),  # the odd one
    ]
    mesh: ServedMesh | None = None
    try:
        for worker in workers:
            _wait_listening(worker)
        flags = ["--prefill-addr", workers[0].address, "--http-port", "-1", *store]
        for decode in workers[1:]:
            flags += ["--decode-addr", decode.address]
        mesh = ServedMesh(_serve("gateway", *flags, log_dir=logs), workers)  # no --dtype
        _wait_listening(mesh.gateway)
        yield mesh
    finally:
        for service in ([mesh.gateway] if mesh else []) + workers:
            _stop(service)
        stop_redis(redis)


@pytest.fixture(scope="module")
def bf16_llm() -> LLM:
    return LLM(EngineConfig(device="cpu", dtype="bfloat16"))


def test_gateway_without_dtype_serves_the_workers_bfloat16_tokens(
    served: ServedMesh, bf16_llm: LLM
) -> None:
    params = SamplingParams(max_tokens=8, temperature=0)
    expected = [out.token_ids for out in bf16_llm.generate(PROMPTS, params)]
    with grpc.insecure_channel(served.gateway.address) as channel:
        stub = gen_grpc.GenerationStub(channel)
        for prompt, tokens in zip(PROMPTS, expected, strict=True):
            request = gen_pb.GenerateRequest(prompt=prompt, max_tokens=8, temperature=0)
            reply = stub.GenerateUnary(request, timeout=120)
            assert list(reply.token_ids) == tokens, prompt
        info = stub.ModelInfo(gen_pb.ModelInfoRequest(), timeout=10)
    assert info.max_model_len == bf16_llm.engine.max_model_len
    assert info.block_size == 16 and info.num_decode_workers == 2
    log = served.gateway.log_text()
    adopted = re.findall(r"KV namespace '([^']+)'\), as its workers report", log)
    assert len(adopted) == 1 and adopted[0].endswith("|bfloat16|16"), adopted


def test_a_worker_of_another_dtype_is_refused_with_one_line_and_the_rest_serve(
    served: ServedMesh,
) -> None:
    with grpc.insecure_channel(served.gateway.address) as channel:
        stub = gen_grpc.GenerationStub(channel)
        for index in range(6):  # the float32 worker has more free blocks: it would be picked
            request = gen_pb.GenerateRequest(prompt=f"Count to {index}.", max_tokens=4)
            assert stub.GenerateUnary(request, timeout=120).usage.completion_tokens == 4
        assert stub.ModelInfo(gen_pb.ModelInfoRequest(), timeout=10).num_refused_workers == 1
    odd = served.workers[2].address
    lines = [line for line in served.gateway.log_text().splitlines() if "refusing" in line]
    assert len(lines) == 1, lines
    assert odd in lines[0] and "|float32|16'" in lines[0] and "|bfloat16|16'" in lines[0]
    metrics = urllib.request.urlopen(served.gateway.metrics, timeout=10).read().decode()
    assert 'pdmesh_gateway_workers{role="decode",state="refused"} 1.0' in metrics
    assert 'pdmesh_gateway_workers{role="decode",state="serving"} 1.0' in metrics
    with grpc.insecure_channel(odd) as channel:
        load = worker_grpc.DecodeWorkerStub(channel).Load(
            worker_pb.LoadRequest(), timeout=10, metadata=bearer_metadata(SECRET)
        )
    assert load.num_loaded_blocks == 0, "a request reached the refused worker"
    assert load.namespace.endswith("|float32|16")
