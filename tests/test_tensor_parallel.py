"""Tensor parallelism on the CPU with gloo: sharded engines produce the same greedy tokens as
unsharded ones, and the KV hand-off works across different TP sizes."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.config import CacheConfig, EngineConfig
from engine.errors import InvalidRequestError
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from pdmesh.mesh import MeshConfig
from pdmesh.v1 import generation_pb2 as gen_pb
from tests.mesh.harness import MeshThread, generate
from tests.mesh.test_mesh_e2e import to_request
from tests.test_hf_parity import PROMPTS
from tests.test_tiny_models import random_prompts
from tests.tiny_models import save_tiny_model

GREEDY = SamplingParams(max_tokens=24, temperature=0)


def sharded(config: EngineConfig) -> Iterator[LLM]:
    llm = LLM(config)
    try:
        yield llm
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize(
    ("kind", "world", "overlap"),
    [
        ("llama3", 2, False),
        ("qwen2", 2, False),
        ("mistral_window", 2, False),  # 1 KV head, replicated
        ("llama3", 2, True),  # async scheduling: the leader patches inputs before broadcasting
    ],
)
def test_tiny_models_tp_equals_tp1(kind: str, world: int, overlap: bool, tmp_path: Path) -> None:
    directory = str(save_tiny_model(kind, tmp_path))
    prompts = random_prompts(6, seed=world)
    cache = CacheConfig(block_size=8)
    expected = LLM(EngineConfig(model=directory, device="cpu", cache=cache)).generate(
        prompts, GREEDY
    )
    for llm in sharded(
        EngineConfig(
            model=directory,
            device="cpu",
            cache=cache,
            tensor_parallel_size=world,
            async_scheduling=overlap,
        )
    ):
        got = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]


def test_default_model_tp3_equals_tp1(smol_llm: LLM) -> None:
    # SmolLM2 has 9 query and 3 KV heads: 3 ranks divide them, 2 do not.
    params = SamplingParams(max_tokens=24, temperature=0)
    expected = smol_llm.generate(PROMPTS[:4], params)
    for llm in sharded(EngineConfig(device="cpu", tensor_parallel_size=3)):
        got = llm.generate(PROMPTS[:4], params)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]


def test_unsplittable_heads_are_rejected_clearly() -> None:
    with pytest.raises(InvalidRequestError, match="cannot be split over 2"):
        LLM(EngineConfig(device="cpu", tensor_parallel_size=2))


def test_default_model_hands_off_from_tp3_to_tp1(smol_llm: LLM) -> None:
    # The other direction and other sizes run on the tiny model below (a 3-rank decode of
    # the real model costs minutes on a 2-core machine).
    harness = MeshThread(
        MeshConfig(
            engine=EngineConfig(device="cpu"),
            gateway_port=0,
            num_prefill=1,
            num_decode=1,
            prefill_tp=3,
            decode_tp=1,
        )
    )
    try:
        expected = smol_llm.generate(PROMPTS[:2], SamplingParams(max_tokens=16, temperature=0))
        for prompt, want in zip(PROMPTS[:2], expected, strict=True):
            got = generate(harness.stub, to_request(prompt, max_tokens=16, temperature=0))
            assert list(got.token_ids) == want.token_ids
        harness.wait_idle()
        assert harness.is_idle()
    finally:
        harness.close()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_model("llama3", tmp_path_factory.mktemp("tp_mesh")))


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(2, 1), (1, 2)])
def test_tiny_hand_off_across_tp2(prefill_tp: int, decode_tp: int, tiny_dir: str) -> None:
    prompts = random_prompts(4, seed=11)
    expected = LLM(EngineConfig(model=tiny_dir, device="cpu")).generate(prompts, GREEDY)
    harness = MeshThread(
        MeshConfig(
            engine=EngineConfig(model=tiny_dir, device="cpu"),
            gateway_port=0,
            prefill_tp=prefill_tp,
            decode_tp=decode_tp,
        )
    )
    try:
        for prompt, want in zip(prompts, expected, strict=True):
            request = gen_pb.GenerateRequest(prompt_token_ids=prompt, max_tokens=24, temperature=0)
            assert list(generate(harness.stub, request).token_ids) == want.token_ids
    finally:
        harness.close()


def test_dead_rank_takes_the_worker_out_of_service(tiny_dir: str) -> None:
    harness = MeshThread(
        MeshConfig(engine=EngineConfig(model=tiny_dir, device="cpu"), gateway_port=0, prefill_tp=2)
    )
    try:
        request = gen_pb.GenerateRequest(prompt_token_ids=[1, 2, 3], max_tokens=4, temperature=0)
        assert len(generate(harness.stub, request).token_ids) == 4
        prefill = harness.mesh.workers[0]
        assert prefill.engine.info is not None and len(prefill.engine.info.rank_pids) == 1
        os.kill(prefill.engine.info.rank_pids[0], signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as info:
            generate(harness.stub, request)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(prefill.address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert harness.mesh.store.stats().num_pinned_blocks == 0
    finally:
        harness.close()
