"""A sparse family end to end through the mesh: a tiny Qwen3-MoE (q/k norm, routed experts)
served by a prefill and a decode worker, its KV handed off through the store, matches Hugging
Face greedy token for token, and a repeated prompt reuses its cached prefix."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from pdmesh.mesh import MeshConfig
from pdmesh.v1 import generation_pb2 as gen_pb
from tests.conftest import hf_greedy
from tests.mesh.harness import MeshThread, generate
from tests.test_tiny_models import random_prompts
from tests.tiny_models import load_hf, save_tiny_model

NEW_TOKENS = 12


def test_qwen3_moe_through_the_mesh(tmp_path_factory: pytest.TempPathFactory) -> None:
    directory = save_tiny_model("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe"))
    hf = load_hf(directory)
    prompts = [*random_prompts(2, seed=5), list(range(1, 41))]
    expected = [hf_greedy(hf, prompt, NEW_TOKENS) for prompt in prompts]
    harness = MeshThread(
        MeshConfig(engine=EngineConfig(model=str(directory), device="cpu"), gateway_port=0)
    )
    try:
        for prompt, want in [*zip(prompts, expected, strict=True), (prompts[-1], expected[-1])]:
            request = gen_pb.GenerateRequest(
                prompt_token_ids=prompt, max_tokens=NEW_TOKENS, temperature=0
            )
            reply = generate(harness.stub, request)
            assert list(reply.token_ids) == want
        # The repeated 40-token prompt found its full blocks in the store.
        assert reply.usage.cached_tokens > 0
        harness.wait_idle()
        assert harness.is_idle()
    finally:
        harness.close()
