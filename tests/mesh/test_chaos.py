"""Chaos on a mesh of 2 prefill + 2 decode workers sharing a real redis-server: a decode
worker killed mid-stream fails only its own streams (UNAVAILABLE) and rejoins when
restarted; a prefill worker killed mid-prompt has its request retried on the other; Redis
going away gives a clear UNAVAILABLE and the mesh recovers when it returns. After each,
no KV block or store pin is left. A worker whose engine-core process dies fails its streams
with UNAVAILABLE and goes out of service."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.config import EngineConfig
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from gateway.router import Worker
from pdmesh.mesh import MeshConfig
from pdmesh.shutdown import drain_worker
from pdmesh.v1 import generation_pb2 as gen_pb
from tests.mesh.harness import MeshThread, generate
from tests.redis_server import start_redis, stop_redis

PROMPTS = ["Name a fruit:", "Count to five:", "Describe the sea.", "Why is the sky blue?"]
NEW_TOKENS = 24


class ChaosMesh:
    def __init__(self) -> None:
        self.redis, self.url = start_redis()
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])
        config = MeshConfig(
            engine=EngineConfig(device="cpu"), gateway_port=0, num_prefill=2, num_decode=2,
            store=self.url, metrics_port=0,
        )  # fmt: skip
        self.harness = MeshThread(config)

    def indexes(self, role: str) -> list[int]:
        return [i for i, w in enumerate(self.harness.mesh.workers) if w.role == role]

    def router_worker(self, index: int) -> Worker:
        core = self.harness.mesh.core
        assert core is not None
        address = self.harness.mesh.workers[index].address
        return next(w for w in core.router.workers if w.address.endswith(address.split(":")[1]))

    def holds(self, index: int, request_id: str) -> bool:
        """Whether worker ``index`` runs the client's ``request_id`` (workers know it in its
        caller's namespace: "<caller tag>-<id>")."""
        running = self.harness.mesh.workers[index].engine.running_ids()
        return any(r == request_id or r.endswith(f"-{request_id}") for r in running)

    def restart(self, index: int) -> None:
        """A fresh worker on the old address; the gateway must take it back by itself."""
        self.harness.restart_worker(index)
        wait_for(lambda: self.router_worker(index).healthy, "the restarted worker rejoins")


def wait_for(condition: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def chaos() -> Iterator[ChaosMesh]:
    mesh = ChaosMesh()
    yield mesh
    mesh.harness.close()
    stop_redis(mesh.redis)


@pytest.fixture(scope="module")
def references(smol_llm: LLM) -> list[list[int]]:
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    return [out.token_ids for out in smol_llm.generate(PROMPTS, greedy)]


def _request(index: int, request_id: str) -> gen_pb.GenerateRequest:
    return gen_pb.GenerateRequest(
        request_id=request_id, prompt=PROMPTS[index], max_tokens=NEW_TOKENS, temperature=0,
        ignore_eos=True,
    )  # fmt: skip


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _gateway_health(harness: MeshThread) -> Any:
    request = health_pb2.HealthCheckRequest(service="pdmesh.v1.Generation")
    return health_pb2_grpc.HealthStub(harness.channel).Check(request, timeout=10).status


def _gateway_metrics(harness: MeshThread) -> str:
    core = harness.mesh.core
    assert core is not None and core.metrics is not None
    url = f"http://127.0.0.1:{core.metrics.port}/metrics"
    return urllib.request.urlopen(url, timeout=10).read().decode()  # type: ignore[no-any-return]


def _finish(stream: Any, tokens: list[int]) -> grpc.StatusCode:
    try:
        for piece in stream:
            tokens.extend(piece.token_ids)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_draining_worker_finishes_its_streams_and_gets_no_new_ones(
    chaos: ChaosMesh, references: list[list[int]]
) -> None:
    """What SIGTERM does to `pdmesh serve decode`: NOT_SERVING, out of rotation, the running
    stream completes, then the drain returns."""
    harness = chaos.harness
    stream = harness.stub.Generate(_request(2, "drained"), timeout=300)
    tokens = list(next(stream).token_ids) + list(next(stream).token_ids)
    victim = next(d for d in chaos.indexes("decode") if chaos.holds(d, "drained"))
    worker = harness.mesh.workers[victim]
    drained = asyncio.run_coroutine_threadsafe(
        drain_worker(worker.server, worker.engine, timeout_s=120), harness.loop
    )
    wait_for(lambda: not chaos.router_worker(victim).healthy, "the router drops the worker")
    with grpc.insecure_channel(worker.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    other = generate(harness.stub, _request(3, "during-drain"))  # served by the other worker
    assert list(other.token_ids) == references[3]
    assert _finish(stream, tokens) == grpc.StatusCode.OK and tokens == references[2]
    drained.result(timeout=120)
    harness.loop.call_soon_threadsafe(worker.engine.drain, False)  # back in service
    harness.run(worker.server.set_serving())
    wait_for(lambda: chaos.router_worker(victim).healthy, "the worker rejoins")
    harness.wait_idle()
    assert harness.is_idle()


def test_killed_decode_worker_fails_only_its_streams_and_rejoins(
    chaos: ChaosMesh, references: list[list[int]]
) -> None:
    harness = chaos.harness
    streams, tokens = [], []
    for index in range(len(PROMPTS)):
        streams.append(harness.stub.Generate(_request(index, f"decode-{index}"), timeout=300))
        tokens.append(list(next(streams[-1]).token_ids))
    for index, stream in enumerate(streams):  # every stream is decoding now
        tokens[index].extend(next(stream).token_ids)
    decode = chaos.indexes("decode")
    placement = {
        i: next(d for d in decode if chaos.holds(d, f"decode-{i}")) for i in range(len(PROMPTS))
    }
    victim = decode[0]
    assert set(placement.values()) == set(decode), "streams should spread over both workers"
    killed = harness.kill_worker(victim)
    for index, stream in enumerate(streams):
        status = _finish(stream, tokens[index])
        if placement[index] == victim:
            assert status == grpc.StatusCode.UNAVAILABLE
        else:
            assert status == grpc.StatusCode.OK
            assert tokens[index] == references[index]
    # The killed worker's requests were aborted with its calls: nothing held there either.
    wait_for(lambda: killed.engine.load().num_used_blocks == 0, "the killed worker frees")
    chaos.restart(victim)
    # Two concurrent streams go one to each decode worker, the restarted one included.
    again = [harness.stub.Generate(_request(i, f"again-{i}"), timeout=300) for i in (0, 1)]
    got = [list(next(s).token_ids) for s in again]
    # Seen while it runs there (a look after more tokens could come after it finished).
    wait_for(
        lambda: chaos.holds(victim, "again-0") or chaos.holds(victim, "again-1"),
        "the restarted worker takes one of the two",
        timeout=30,
    )
    for index, stream in enumerate(again):
        assert _finish(stream, got[index]) == grpc.StatusCode.OK
        assert got[index] == references[index]
    harness.wait_idle()
    assert harness.is_idle()


def test_killed_engine_core_fails_its_streams_and_leaves_service(
    chaos: ChaosMesh, references: list[list[int]]
) -> None:
    """The worker's server lives on; its engine process does not: UNAVAILABLE for the
    streams it held, NOT_SERVING for health, the other worker serves, no pin is left."""
    harness = chaos.harness
    stream = harness.stub.Generate(_request(0, "core-killed"), timeout=300)
    tokens = list(next(stream).token_ids) + list(next(stream).token_ids)
    victim = next(d for d in chaos.indexes("decode") if chaos.holds(d, "core-killed"))
    worker = harness.mesh.workers[victim]
    assert worker.engine.pid is not None
    os.kill(worker.engine.pid, signal.SIGKILL)
    assert _finish(stream, tokens) == grpc.StatusCode.UNAVAILABLE
    wait_for(lambda: not chaos.router_worker(victim).healthy, "the router drops the worker")
    with grpc.insecure_channel(worker.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    other = generate(harness.stub, _request(1, "after-core-killed"))
    assert list(other.token_ids) == references[1]
    wait_for(lambda: harness.mesh.store.stats().num_pinned_blocks == 0, "no pin is left")
    harness.kill_worker(victim)
    chaos.restart(victim)
    harness.wait_idle()
    assert harness.is_idle()


def test_killed_prefill_worker_mid_prompt_is_retried_on_the_other(
    chaos: ChaosMesh, smol_llm: LLM
) -> None:
    harness = chaos.harness
    prompt = " ".join(f"station {i} logs {i * 3} trains" for i in range(70))
    expected = smol_llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0))[0]
    request = gen_pb.GenerateRequest(
        request_id="retried", prompt=prompt, max_tokens=4, temperature=0
    )
    result: dict[str, Any] = {}
    client = threading.Thread(target=lambda: result.update(reply=generate(harness.stub, request)))
    client.start()
    prefill = chaos.indexes("prefill")
    wait_for(lambda: any(chaos.holds(p, "retried") for p in prefill), "a prefill starts")
    victim = next(p for p in prefill if chaos.holds(p, "retried"))
    harness.kill_worker(victim)
    client.join(timeout=300)
    assert list(result["reply"].token_ids) == expected.token_ids
    # The router sent it to both: first to the victim, then, after UNAVAILABLE, to the other.
    for index in prefill:
        assert "retried" in chaos.router_worker(index).recent_requests
    chaos.restart(victim)
    harness.wait_idle()
    assert harness.is_idle()


def test_redis_loss_is_unavailable_and_the_mesh_recovers(
    chaos: ChaosMesh, references: list[list[int]]
) -> None:
    harness = chaos.harness
    stop_redis(chaos.redis)
    with pytest.raises(grpc.RpcError) as info:
        generate(harness.stub, _request(0, "no-redis"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "KV store unavailable" in (info.value.details() or "")
    # The outage is named as one: health NOT_SERVING, no worker taken out of service, and
    # /metrics answers, with the store marked down.
    wait_for(lambda: _gateway_health(harness) == NOT_SERVING, "the gateway turns NOT_SERVING")
    assert all(chaos.router_worker(i).healthy for i in range(len(harness.mesh.workers)))
    assert "pdmesh_kv_store_up 0.0" in _gateway_metrics(harness)
    chaos.redis, _ = start_redis(port=chaos.port)
    wait_for(lambda: _gateway_health(harness) == SERVING, "the gateway serves again")
    assert "pdmesh_kv_store_up 1.0" in _gateway_metrics(harness)
    reply = generate(harness.stub, _request(1, "redis-back"))
    assert list(reply.token_ids) == references[1]
    harness.wait_idle()
    assert harness.is_idle()
