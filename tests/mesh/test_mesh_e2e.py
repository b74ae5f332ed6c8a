"""The mesh end to end over real sockets: gateway -> prefill -> store -> decode -> client."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch

from engine.config import EngineConfig
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from pdmesh.mesh import MeshConfig
from pdmesh.v1 import generation_pb2 as gen_pb
from tests.conftest import hf_greedy
from tests.mesh.harness import MeshThread, generate
from tests.redis_server import start_redis, stop_redis
from tests.test_hf_parity import PROMPTS

NEW_TOKENS = 32  # 64 against Hugging Face in tests/test_hf_parity.py


def to_request(prompt: str | list[dict[str, str]], **kwargs: object) -> gen_pb.GenerateRequest:
    request = gen_pb.GenerateRequest(**kwargs)  # type: ignore[arg-type]
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.messages.extend(gen_pb.ChatMessage(**m) for m in prompt)
    return request


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshThread]:
    """A prefill and a decode worker sharing the embedded store (routing over several
    workers: test_colocated_and_routing, test_chaos)."""
    config = MeshConfig(engine=EngineConfig(device="cpu"), gateway_port=0)
    harness = MeshThread(config)
    yield harness
    harness.close()


@pytest.fixture(params=["embedded", "redis"])
def any_store_mesh(request: pytest.FixtureRequest, mesh: MeshThread) -> Iterator[MeshThread]:
    """The shared mesh, or one prefill and one decode worker on a real redis-server."""
    if request.param == "embedded":
        yield mesh
        return
    redis, store = start_redis()
    config = MeshConfig(engine=EngineConfig(device="cpu"), gateway_port=0, store=store)
    harness = MeshThread(config)
    yield harness
    harness.close()
    stop_redis(redis)


@pytest.fixture(scope="module")
def references(smol_llm: LLM, hf_smol: torch.nn.Module) -> tuple[list[Any], dict[int, list[int]]]:
    """The engine's outputs for PROMPTS and HF's for two of them, computed once for both
    stores."""
    expected = smol_llm.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
    hf = {i: hf_greedy(hf_smol, smol_llm.encode(PROMPTS[i]), NEW_TOKENS) for i in (0, 3)}
    return expected, hf


def test_greedy_outputs_match_engine_and_hugging_face(
    any_store_mesh: MeshThread, references: tuple[list[Any], dict[int, list[int]]]
) -> None:
    mesh = any_store_mesh
    expected, hf_outputs = references
    results: dict[int, gen_pb.GenerateResponse] = {}

    def run(index: int) -> None:
        request = to_request(PROMPTS[index], max_tokens=NEW_TOKENS, temperature=0)
        results[index] = generate(mesh.stub, request)

    # Every prompt on the default store; on redis the first four (both HF-checked ones).
    count = len(PROMPTS) if mesh.mesh.config.store == "embedded" else 4
    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, want in enumerate(expected[:count]):
        got = results[index]
        assert list(got.token_ids) == want.token_ids, PROMPTS[index]
        assert got.text == want.text
        assert got.usage.completion_tokens == len(want.token_ids)
        assert got.finish_reason in (gen_pb.FINISH_REASON_STOP, gen_pb.FINISH_REASON_LENGTH)
    for index, hf_tokens in hf_outputs.items():  # and directly against Hugging Face
        assert list(results[index].token_ids) == hf_tokens
    mesh.wait_idle()
    assert mesh.is_idle()


def test_64_concurrent_streams_are_complete_and_leave_nothing(
    mesh: MeshThread, smol_llm: LLM
) -> None:
    prompts = [f"Count from {i} to {i + 5}:" for i in range(8)]
    expected = smol_llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0))
    results: list[gen_pb.GenerateResponse | None] = [None] * 64

    def run(index: int) -> None:
        request = to_request(prompts[index % 8], max_tokens=8, temperature=0)
        results[index] = generate(mesh.stub, request)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, got in enumerate(results):
        assert got is not None and list(got.token_ids) == expected[index % 8].token_ids
    mesh.wait_idle()
    assert mesh.is_idle()


def test_cancelled_stream_frees_its_blocks_everywhere(mesh: MeshThread) -> None:
    request = to_request("Tell me a very long story.", max_tokens=400, ignore_eos=True)
    stream = mesh.stub.Generate(request, timeout=300)
    for count, _ in enumerate(stream):
        if count == 5:
            break
    assert not mesh.is_idle(), "the request is still decoding and holds blocks"
    stream.cancel()
    mesh.wait_idle()
    assert mesh.is_idle()


def test_repeated_long_prompt_reuses_cached_blocks(mesh: MeshThread) -> None:
    prompt = "Background: " + "the archive holds letters, maps and ledgers. " * 30 + "Question:"
    first = generate(mesh.stub, to_request(prompt, max_tokens=8, temperature=0))
    second = generate(mesh.stub, to_request(prompt, max_tokens=8, temperature=0))
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens > 0
    assert list(second.token_ids) == list(first.token_ids)
    print(
        f"TTFT cold {first.timings.time_to_first_token_ms:.1f} ms, "
        f"cached {second.timings.time_to_first_token_ms:.1f} ms"
    )


@pytest.mark.parametrize(
    ("request_kwargs", "message"),
    [
        ({"prompt": "hi", "prompt_token_ids": [1, 2]}, "exactly one of"),
        ({"prompt": "hi", "top_p": 2.0}, "top_p"),
        ({"prompt_token_ids": [10**6]}, "token ids must be in"),
        ({"prompt": "hi", "max_tokens": 10**6}, "maximum model length"),
        # fcfs workers would ignore it: refused, as vLLM refuses it without priority scheduling
        ({"prompt": "hi", "priority": 3}, "--scheduling-policy priority"),
    ],
)
def test_bad_requests_get_invalid_argument(
    mesh: MeshThread, request_kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        generate(mesh.stub, gen_pb.GenerateRequest(**request_kwargs))  # type: ignore[arg-type]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (info.value.details() or "")


def test_tokenize_and_model_info(mesh: MeshThread, smol_llm: LLM) -> None:
    tokens = mesh.stub.Tokenize(gen_pb.TokenizeRequest(prompt="Hello world"))
    assert list(tokens.token_ids) == smol_llm.encode("Hello world")
    info = mesh.stub.ModelInfo(gen_pb.ModelInfoRequest())
    assert info.num_prefill_workers == 1 and info.num_decode_workers == 1
    assert info.block_size == 16 and info.vocab_size == 49152


def test_abort_rpc_ends_the_stream_and_frees_blocks(mesh: MeshThread) -> None:
    request = to_request(
        "Write a long poem.", max_tokens=400, ignore_eos=True, request_id="to-abort"
    )
    stream = mesh.stub.Generate(request, timeout=300)
    pieces = []
    for piece in stream:
        pieces.append(piece)
        if len(pieces) == 3:
            reply = mesh.stub.Abort(gen_pb.AbortRequest(request_id="to-abort"))
            assert reply.aborted
    assert pieces[-1].finish_reason == gen_pb.FINISH_REASON_ABORT
    assert pieces[-1].usage.completion_tokens < 400
    assert not mesh.stub.Abort(gen_pb.AbortRequest(request_id="to-abort")).aborted
    mesh.wait_idle()
    assert mesh.is_idle()


def test_abort_while_waiting_for_prefill_ends_at_once(mesh: MeshThread) -> None:
    # A long prompt keeps the prefill busy; the Abort must not wait for its first token.
    prompt = " ".join(f"item {i} costs {i * 7} coins" for i in range(300))
    request = to_request(prompt, max_tokens=4, request_id="early-abort")
    stream = mesh.stub.Generate(request, timeout=300)
    time.sleep(0.5)
    assert mesh.stub.Abort(gen_pb.AbortRequest(request_id="early-abort")).aborted
    pieces = list(stream)
    assert pieces[-1].finish_reason == gen_pb.FINISH_REASON_ABORT
    assert pieces[-1].usage.completion_tokens == 0
    mesh.wait_idle()
    assert mesh.is_idle()


def test_a_client_that_stops_reading_slows_no_one_and_loses_nothing(
    mesh: MeshThread, smol_llm: LLM
) -> None:
    prompt = "List the planets of the solar system:"
    want = smol_llm.generate([prompt], SamplingParams(max_tokens=32, temperature=0))[0]
    stalled = mesh.stub.Generate(to_request(prompt, max_tokens=32, temperature=0), timeout=300)
    first = next(stalled)  # running; now it is not read while others come and go
    others: list[gen_pb.GenerateResponse] = []

    def run() -> None:
        others.append(generate(mesh.stub, to_request(prompt, max_tokens=32, temperature=0)))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(others) == 3 and all(list(o.token_ids) == want.token_ids for o in others)
    pieces = [first, *stalled]
    assert [t for p in pieces for t in p.token_ids] == want.token_ids
    assert "".join(p.text for p in pieces) == want.text
    mesh.wait_idle()
    assert mesh.is_idle()


def test_a_huge_prompt_being_tokenized_stalls_no_stream(mesh: MeshThread) -> None:
    request = to_request("Count to one hundred:", max_tokens=300, ignore_eos=True)
    stream = mesh.stub.Generate(request, timeout=300)
    next(stream)
    arrivals: list[float] = []

    def read() -> None:
        try:
            for _ in stream:
                arrivals.append(time.monotonic())
        except grpc.RpcError as error:  # cancelled below, once the prompt is tokenized
            assert error.code() == grpc.StatusCode.CANCELLED

    reader = threading.Thread(target=read)
    reader.start()
    huge = " ".join(f"word{i} lorem ipsum" for i in range(45_000))  # nearly 1 MB of text
    started = time.monotonic()
    tokens = mesh.stub.Tokenize(gen_pb.TokenizeRequest(prompt=huge), timeout=120)
    ended = time.monotonic()
    stream.cancel()
    reader.join()
    assert len(tokens.token_ids) > 100_000
    during = [t for t in arrivals if started < t < ended]
    assert len(during) >= 3, f"{len(during)} tokens streamed in {ended - started:.1f} s"
    mesh.wait_idle()
