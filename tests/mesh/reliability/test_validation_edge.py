"""Every kind of bad request gets INVALID_ARGUMENT (or, past the transport's own limit,
RESOURCE_EXHAUSTED) with a message naming what is wrong, and the mesh keeps serving."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from pdmesh.v1 import generation_pb2 as gen_pb
from pdmesh.v1 import generation_pb2_grpc as gen_grpc
from tests.mesh.harness import MeshThread
from tests.mesh.reliability.common import (
    MAX_REQUEST_BYTES,
    assert_serving_and_idle,
    status_of,
)

CONTEXT = 8192  # SmolLM2's maximum model length
HI = {"prompt": "hi"}
ROBOT = [gen_pb.ChatMessage(role="robot", content="beep")]

CASES: dict[str, tuple[dict[str, Any], str]] = {
    "no input": ({"max_tokens": 2}, "set exactly one of prompt, messages or prompt_token_ids"),
    "two inputs": (
        {"prompt": "hi", "messages": [gen_pb.ChatMessage(role="user", content="hi")]},
        "set exactly one of",
    ),
    "empty prompt": ({"prompt": ""}, "prompt is empty"),
    "text prompt longer than the context": (
        {"prompt": "hello " * 9000},
        "the maximum model length is 8192",
    ),
    "token prompt longer than the context": (
        {"prompt_token_ids": [1] * CONTEXT},
        "prompt_token_ids has 8192 tokens",
    ),
    "max_tokens zero": ({**HI, "max_tokens": 0}, "max_tokens must be at least 1, got 0"),
    "max_tokens negative": ({**HI, "max_tokens": -3}, "max_tokens must be at least 1, got -3"),
    "max_tokens beyond the context": (
        {**HI, "max_tokens": CONTEXT},
        "max_tokens (8192) exceeds the maximum model length 8192",
    ),
    "prompt plus max_tokens beyond the context": (
        {"prompt_token_ids": [1] * 100, "max_tokens": CONTEXT - 50},
        "prompt (100 tokens) + max_tokens (8142) exceeds the maximum model length",
    ),
    "negative temperature": ({**HI, "temperature": -0.5}, "temperature must be >= 0, got -0.5"),
    "NaN temperature": ({**HI, "temperature": float("nan")}, "temperature must be a finite"),
    "infinite temperature": ({**HI, "temperature": float("inf")}, "temperature must be a finite"),
    "top_p zero": ({**HI, "top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    "top_p above one": ({**HI, "top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
    "top_k negative": ({**HI, "top_k": -1}, "top_k must be >= 0"),
    "min_p above one": ({**HI, "min_p": 2.0}, "min_p must be in [0, 1]"),
    "repetition_penalty zero": ({**HI, "repetition_penalty": 0.0}, "repetition_penalty must"),
    "logprobs too many": ({**HI, "logprobs": 50}, "logprobs must be in [0, 20]"),
    "empty stop string": ({**HI, "stop": [""]}, "stop strings must be non-empty"),
    "negative token id": (
        {"prompt_token_ids": [5, -1]},
        "prompt_token_ids[1] = -1: token ids must be in [0, 49152)",
    ),
    "token id past the vocabulary": (
        {"prompt_token_ids": [49152]},
        "prompt_token_ids[0] = 49152",
    ),
    "stop token id past the vocabulary": (
        {**HI, "stop_token_ids": [10**6]},
        "stop_token_ids[0] = 1000000",
    ),
    "unknown chat role": ({"messages": ROBOT}, "messages[0].role is 'robot'"),
    "long request id": ({**HI, "request_id": "x" * 300}, "request_id is longer than 128"),
    "oversized message": (
        {"prompt": "a" * (MAX_REQUEST_BYTES + 16)},
        f"more than this server's limit of {MAX_REQUEST_BYTES} (max_request_bytes)",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_is_refused_by_name(shared_mesh: MeshThread, case: str) -> None:
    fields, message = CASES[case]
    call = shared_mesh.stub.Generate(gen_pb.GenerateRequest(**fields), timeout=60)
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert message in (info.value.details() or "")
    # The unary method validates the same way.
    with pytest.raises(grpc.RpcError) as unary:
        shared_mesh.stub.GenerateUnary(gen_pb.GenerateRequest(**fields), timeout=60)
    assert unary.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert shared_mesh.stub.ModelInfo(gen_pb.ModelInfoRequest(), timeout=10).vocab_size > 0


def _raw_generate(mesh: MeshThread) -> Any:
    """Generate with bytes sent as they are, so the test can put anything on the wire."""
    return mesh.channel.unary_stream(
        "/pdmesh.v1.Generation/Generate",
        request_serializer=lambda raw: raw,
        response_deserializer=gen_pb.GenerateResponse.FromString,
    )


@pytest.mark.parametrize("field", ["prompt", "message content", "stop"])
def test_invalid_utf8_is_invalid_argument(shared_mesh: MeshThread, field: str) -> None:
    marker = "\u00e9MARK"  # replaced by a byte that is never valid UTF-8 on its own
    request = gen_pb.GenerateRequest(max_tokens=2)
    if field == "prompt":
        request.prompt = marker
    elif field == "message content":
        request.messages.append(gen_pb.ChatMessage(role="user", content=marker))
    else:
        request.prompt, request.stop[:] = "hi", [marker]
    raw = request.SerializeToString().replace(marker.encode(), b"\xff\xfeMARK!")
    with pytest.raises(grpc.RpcError) as info:
        list(_raw_generate(shared_mesh)(raw, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert "cannot be parsed" in details and "UTF-8" in details


def test_truncated_message_is_invalid_argument(shared_mesh: MeshThread) -> None:
    raw = gen_pb.GenerateRequest(prompt="hello there", max_tokens=2).SerializeToString()
    status = status_of(_raw_generate(shared_mesh)(raw[:-3], timeout=30))
    assert status == grpc.StatusCode.INVALID_ARGUMENT


def test_message_past_the_transport_limit_is_resource_exhausted(shared_mesh: MeshThread) -> None:
    # Beyond twice max_request_bytes gRPC refuses the message before it is read whole.
    request = gen_pb.GenerateRequest(prompt="a" * (3 * MAX_REQUEST_BYTES))
    with pytest.raises(grpc.RpcError) as info:
        shared_mesh.stub.GenerateUnary(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (info.value.details() or "")


def test_bad_tokenize_request_is_invalid_argument(shared_mesh: MeshThread) -> None:
    stub = gen_grpc.GenerationStub(shared_mesh.channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Tokenize(gen_pb.TokenizeRequest(messages=ROBOT), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages[0].role" in (info.value.details() or "")


def test_mesh_serves_after_bad_requests(shared_mesh: MeshThread) -> None:
    assert_serving_and_idle(shared_mesh)
