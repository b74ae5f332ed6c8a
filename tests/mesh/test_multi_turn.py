"""Multi-turn reuse and the pipelined hand-off through a real mesh.

A conversation's turn k+1 repeats turns 1..k through the chat template; the decode worker
left turn k's prompt and output in the store, so the prefill only computes the new message.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from engine.config import EngineConfig, SchedulerConfig
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from engine.tokenizer import encode_prompt
from pdmesh.mesh import MeshConfig
from pdmesh.v1 import generation_pb2 as gen_pb
from tests.mesh.harness import MeshThread, generate
from tests.mesh.test_mesh_e2e import to_request
from tests.redis_server import start_redis, stop_redis

BLOCK = 16
USER_TURNS = [
    "What is the capital of France?",
    "And the capital of Germany?",
    "Which of the two cities is larger?",
    "Name a river that flows through each.",
    "Summarize our conversation in one sentence.",
]
MAX_TOKENS = 48
# The embedded store of a mesh is a private index with a shared-memory data plane.
PATHS = {"embedded": "shared-memory", "redis": "redis"}


def rendered_length(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    """Tokens of ``messages`` as the chat template renders them inside a longer prompt."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return len(ids)


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshThread]:
    """On a real redis-server (the embedded store's prefix reuse is covered end to end in
    test_mesh_e2e)."""
    redis, store = start_redis()
    harness = MeshThread(MeshConfig(engine=EngineConfig(device="cpu"), gateway_port=0, store=store))
    try:
        yield harness
    finally:
        harness.close()
        stop_redis(redis)


def test_five_turn_chat_reuses_every_previous_turn(
    mesh: MeshThread, smol_llm_no_cache: LLM
) -> None:
    tokenizer = smol_llm_no_cache.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    messages: list[dict[str, str]] = []
    for turn, user in enumerate(USER_TURNS):
        messages.append({"role": "user", "content": user})
        reply = generate(mesh.stub, to_request(messages, max_tokens=MAX_TOKENS, temperature=0))
        prompt = encode_prompt(tokenizer, messages)
        # The same conversation without any cache: one engine, prefix caching off.
        expected = smol_llm_no_cache.generate([prompt], SamplingParams(MAX_TOKENS, 0))[0]
        assert list(reply.token_ids) == expected.token_ids, f"turn {turn + 1}"
        assert reply.usage.prompt_tokens == len(prompt)
        if turn:
            # Turns 1..k as they appear in this prompt end "<|im_end|>" "\n": the model wrote
            # the first (its K/V is stored), the template adds the second after it, so the
            # guarantee is everything up to the end-of-turn token, in whole blocks.
            history = rendered_length(tokenizer, messages[:-1])
            assert prompt[history - 2] == end_of_turn
            assert reply.usage.cached_tokens >= (history - 1) // BLOCK * BLOCK, f"turn {turn + 1}"
        assert reply.usage.cached_tokens <= len(prompt) - 1
        assert reply.finish_reason == gen_pb.FINISH_REASON_STOP, "each reply ends its turn"
        messages.append({"role": "assistant", "content": reply.text})
    mesh.wait_idle()
    assert mesh.is_idle(), "no worker block and no store pin outlives the conversation"
    stats = mesh.mesh.store.stats()
    assert stats.num_blocks > 0 and stats.num_pinned_blocks == 0
    decode = next(w for w in mesh.mesh.workers if w.role == "decode").engine
    assert decode.load().num_retained_blocks > 0 and decode.info is not None
    store = "redis" if "redis" in mesh.mesh.config.store else "embedded"
    assert decode.info.transfer_path == PATHS[store]


def test_abort_while_the_decode_worker_pulls_a_long_prompt() -> None:
    """Small prefill chunks make the prefill long; the decode worker copies its blocks as
    they come. An Abort in the middle leaves no block and no pin anywhere."""
    engine = EngineConfig(
        device="cpu", scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8)
    )
    harness = MeshThread(MeshConfig(engine=engine, gateway_port=0))
    try:
        decode = next(w for w in harness.mesh.workers if w.role == "decode").engine
        prompt = "Notes: " + " ".join(f"item {i} is {i * 7 % 13}." for i in range(150))
        request = gen_pb.GenerateRequest(prompt=prompt, max_tokens=8, request_id="long")
        replies: list[gen_pb.GenerateResponse] = []
        errors: list[BaseException] = []

        def client() -> None:
            try:
                replies.append(generate(harness.stub, request))
            except grpc.RpcError as error:
                errors.append(error)

        thread = threading.Thread(target=client)
        thread.start()
        deadline = time.monotonic() + 120
        while decode.load().num_prefetched_blocks == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert decode.load().num_prefetched_blocks > 0, "the pull started during the prefill"
        assert harness.stub.Abort(gen_pb.AbortRequest(request_id="long")).aborted
        thread.join(timeout=60)
        assert not errors and replies[0].finish_reason == gen_pb.FINISH_REASON_ABORT
        assert decode.load().num_loaded_blocks < -(-replies[0].usage.prompt_tokens // BLOCK)
        harness.wait_idle()
        assert harness.is_idle()
    finally:
        harness.close()
