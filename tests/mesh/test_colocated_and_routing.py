"""Colocated mode behind the same gateway, and cache-aware routing of prompts."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest

from engine.config import EngineConfig
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from gateway.router import Router, Worker
from pdmesh.mesh import MeshConfig
from pdmesh.v1 import generation_pb2 as gen_pb
from tests.mesh.harness import MeshThread, generate
from tests.mesh.test_mesh_e2e import to_request
from tests.test_hf_parity import PROMPTS


@pytest.fixture(scope="module")
def colocated() -> Iterator[MeshThread]:
    harness = MeshThread(
        MeshConfig(engine=EngineConfig(device="cpu"), gateway_port=0, num_prefill=1, colocated=True)
    )
    yield harness
    harness.close()


def test_colocated_outputs_equal_the_engine(colocated: MeshThread, smol_llm: LLM) -> None:
    expected = smol_llm.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0))
    results: dict[int, gen_pb.GenerateResponse] = {}

    def run(index: int) -> None:
        results[index] = generate(
            colocated.stub, to_request(PROMPTS[index], max_tokens=32, temperature=0)
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, want in enumerate(expected):
        assert list(results[index].token_ids) == want.token_ids
        assert results[index].text == want.text
    colocated.wait_idle()
    assert colocated.is_idle()


def test_colocated_reports_cached_tokens_and_frees_on_cancel(colocated: MeshThread) -> None:
    prompt = "Ledger: " + "apples, pears and plums were counted twice. " * 12
    first = generate(colocated.stub, to_request(prompt, max_tokens=4, temperature=0))
    again = generate(colocated.stub, to_request(prompt, max_tokens=4, temperature=0))
    assert again.usage.cached_tokens > 0 and list(again.token_ids) == list(first.token_ids)
    stream = colocated.stub.Generate(to_request("Go on forever.", max_tokens=300, ignore_eos=True))
    for count, _ in enumerate(stream):
        if count == 3:
            break
    stream.cancel()
    colocated.wait_idle()
    assert colocated.is_idle()


def fake_worker(name: str, outstanding: int = 0) -> Worker:
    return Worker(name, "prefill", channel=None, stub=None, outstanding_tokens=outstanding)  # type: ignore[arg-type]


def test_router_prefers_affinity_within_the_imbalance_guard() -> None:
    router = Router([], [], max_imbalance_tokens=1000)
    a, b = fake_worker("a"), fake_worker("b")
    router.prefill = [a, b]
    prefix = [bytes([i]) * 16 for i in range(8)]
    b.remember(prefix[:6])
    assert router.pick_prompt_worker(prefix) == (b, 6)
    b.outstanding_tokens = 900  # still within the guard
    assert router.pick_prompt_worker(prefix)[0] is b
    b.outstanding_tokens = 1500  # affinity no longer worth the imbalance
    assert router.pick_prompt_worker(prefix) == (a, 0)
    b.healthy = False
    a.outstanding_tokens = 10**6
    assert router.pick_prompt_worker(prefix)[0] is a


def test_prefix_sharing_requests_land_where_their_blocks_are(smol_llm: LLM) -> None:
    harness = MeshThread(
        MeshConfig(engine=EngineConfig(device="cpu"), gateway_port=0, num_prefill=2, num_decode=1)
    )
    try:
        topics = {
            "A": " ".join(f"star{i} orbit{i}" for i in range(40)),
            "B": " ".join(f"leaf{i} root{i}" for i in range(40)),
        }
        order = ["A1", "B1", "A2", "B2", "A3", "B3"]
        for request_id in order:
            prompt = f"Context: {topics[request_id[0]]}\nQuestion {request_id}:"
            reply = generate(
                harness.stub, to_request(prompt, max_tokens=2, temperature=0, request_id=request_id)
            )
            if request_id[1] != "1":
                assert reply.usage.cached_tokens >= 64
        assert harness.mesh.core is not None
        placements = {w.address: set(w.recent_requests) for w in harness.mesh.core.router.prefill}
        groups = sorted(placements.values(), key=sorted)
        assert groups == [{"A1", "A2", "A3"}, {"B1", "B2", "B3"}]
        routed = [w.routed_tokens for w in harness.mesh.core.router.prefill]
        assert max(routed) - min(routed) <= harness.mesh.core.router.max_imbalance_tokens
    finally:
        harness.close()


def test_unknown_worker_failure_is_unavailable(colocated: MeshThread) -> None:
    # A gateway whose only worker is gone answers UNAVAILABLE instead of hanging.
    harness_core = colocated.mesh.core
    assert harness_core is not None
    worker = harness_core.router.colocated[0]
    worker.healthy = False
    try:
        with pytest.raises(grpc.RpcError) as info:
            generate(colocated.stub, to_request("hi", max_tokens=2))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        worker.healthy = True
