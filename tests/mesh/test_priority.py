"""Request priorities travel from the client through the gateway to the workers' schedulers:
under --scheduling-policy priority a later, more urgent request overtakes a long one that
holds the decode worker's only seat."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from decode_svc.service import ColocatedServicer, DecodeServicer
from engine.config import EngineConfig, SchedulerConfig
from engine.sampling_params import SamplingParams
from pdmesh.mesh import MeshConfig
from pdmesh.v1 import worker_pb2 as worker_pb
from prefill_svc.service import PrefillServicer
from serving.convert import sampling_to_pb
from tests.mesh.harness import MeshThread, generate
from tests.mesh.test_mesh_e2e import to_request

LONG_TOKENS = 300


@pytest.fixture(scope="module")
def priority_mesh() -> Iterator[MeshThread]:
    scheduler = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=512, policy="priority")
    config = MeshConfig(engine=EngineConfig(device="cpu", scheduler=scheduler), gateway_port=0)
    harness = MeshThread(config)
    yield harness
    harness.close()


def test_an_urgent_request_overtakes_a_long_one(priority_mesh: MeshThread) -> None:
    stub = priority_mesh.stub
    # Each worker tells the gateway it serves by priority (the gateway routes by it).
    assert {load.scheduling_policy for load in priority_mesh.loads()} == {"priority"}
    long = to_request("Count slowly.", max_tokens=LONG_TOKENS, ignore_eos=True, priority=5)
    received: list[int] = []
    started = threading.Event()

    def stream_long() -> None:
        for piece in stub.Generate(long, timeout=300):
            received.extend(piece.token_ids)
            started.set()

    reader = threading.Thread(target=stream_long)
    reader.start()
    assert started.wait(120)
    urgent = generate(stub, to_request("Hi.", max_tokens=4, ignore_eos=True, priority=0))
    num_long_then = len(received)
    reader.join(300)
    assert len(urgent.token_ids) == 4
    # The urgent request ended while the long one still ran: it took the decode worker's one
    # seat (first come, first served, it would have waited for all 300 tokens).
    assert num_long_then < LONG_TOKENS and len(received) == LONG_TOKENS
    deadline = time.monotonic() + 30
    while not priority_mesh.is_idle() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert priority_mesh.is_idle()


def _core(role: str) -> Any:
    info = SimpleNamespace(namespace="ns", block_size=16)
    return SimpleNamespace(role=role, info=info)


def test_every_worker_role_hands_the_priority_to_its_engine() -> None:
    start = worker_pb.StartRequest(
        request_id="r",
        prompt_token_ids=[1, 2],
        sampling=sampling_to_pb(SamplingParams(max_tokens=3), worker_pb.WorkerSampling),
        priority=-7,
    )
    start.kv.namespace = "ns"
    servicers = [PrefillServicer(_core("prefill")), ColocatedServicer(_core("colocated"))]
    decode = DecodeServicer(_core("decode"))
    assert [s.to_add(start).priority for s in servicers] == [-7, -7]
    assert decode.to_add(start).priority == -7 and decode.to_add(start).prefetch
    start.first_token_id = 9
    assert decode.to_add(start).priority == -7 and decode.to_add(start).kv_import == []
