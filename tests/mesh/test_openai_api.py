"""The gateway's OpenAI HTTP API, driven by the real ``openai`` client against one running
mesh (1 prefill + 1 decode worker, API keys on): chat and completions, streamed and not, n
seeded samples over one prefill, logprobs, stops, cached tokens, every error status, and
greedy text equal to the gRPC path and to Hugging Face."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from engine.config import EngineConfig
from engine.tokenizer import encode_prompt
from pdmesh.limits import ServingLimits
from pdmesh.mesh import MeshConfig
from pdmesh.v1 import generation_pb2 as gen_pb
from serving.security import SecurityConfig
from tests.conftest import hf_greedy
from tests.mesh.harness import MeshThread
from tests.mesh.test_mesh_e2e import to_request
from tests.test_hf_parity import PROMPTS

KEY = "sk-test-0123456789abcdef0123456789"
MODEL = "smollm2-test"
NEW_TOKENS = 12
MAX_REQUEST_BYTES = 64 << 10
README = Path(__file__).resolve().parents[2] / "README.md"
#: OpenAI's error object: every error answer is ``{"error": {these}}``.
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshThread]:
    config = MeshConfig(
        engine=EngineConfig(device="cpu"),
        gateway_port=0,
        http_port=0,
        metrics_port=0,
        served_model_name=MODEL,
        security=SecurityConfig(api_keys=frozenset([KEY])),
        limits=ServingLimits(max_request_bytes=MAX_REQUEST_BYTES),
    )
    harness = MeshThread(config)
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def base(mesh: MeshThread) -> str:
    assert mesh.mesh.http_address is not None
    return f"http://{mesh.mesh.http_address}"


@pytest.fixture(scope="module")
def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=300)


def grpc_generate(mesh: MeshThread, request: gen_pb.GenerateRequest) -> gen_pb.GenerateResponse:
    metadata = (("authorization", f"Bearer {KEY}"),)
    whole = gen_pb.GenerateResponse()
    for piece in mesh.stub.Generate(request, timeout=300, metadata=metadata):
        whole.text += piece.text
        whole.token_ids.extend(piece.token_ids)
        if piece.HasField("usage"):
            whole.usage.CopyFrom(piece.usage)
    return whole


def http_greedy(client: openai.OpenAI, prompt: Any, **kwargs: Any) -> Any:
    if isinstance(prompt, str):
        return client.completions.create(model=MODEL, prompt=prompt, **kwargs)
    return client.chat.completions.create(model=MODEL, messages=prompt, **kwargs)


def text_of(response: Any) -> str:
    choice = response.choices[0]
    return choice.text if hasattr(choice, "text") else choice.message.content


def metric(base: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The error object of an error answer, after checking its status and OpenAI's shape."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return dict(error)


def raised_error(raised: pytest.ExceptionInfo[openai.APIStatusError], status: int) -> dict:
    """As ``openai_error``, for what the openai client raised (its raw response)."""
    return openai_error(raised.value.response, status)


def prefill_tokens(mesh: MeshThread) -> float:
    """Prompt tokens the prefill worker has computed so far (its own metrics)."""
    (worker,) = [w for w in mesh.mesh.workers if w.role == "prefill"]
    assert worker.metrics is not None
    value = worker.metrics.registry.get_sample_value("pdmesh_prefill_chunk_tokens_sum")
    return value or 0.0


def test_models_lists_the_served_name_and_another_model_is_404(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    error = raised_error(raised, 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("gpt-4o")
    assert raised_error(raised, 404)["code"] == "model_not_found"


def test_greedy_text_equals_grpc_and_hugging_face(
    mesh: MeshThread, client: openai.OpenAI, hf_smol: torch.nn.Module
) -> None:
    """Every reference prompt of the engine's HF parity test (plain text and chats, the
    template as the gRPC path applies it), sent through both front ends at once."""
    http: dict[int, Any] = {}
    grpc_replies: dict[int, gen_pb.GenerateResponse] = {}

    def run(index: int) -> None:
        prompt = PROMPTS[index]
        http[index] = http_greedy(client, prompt, max_tokens=NEW_TOKENS, temperature=0)
        request = to_request(prompt, max_tokens=NEW_TOKENS, temperature=0)
        grpc_replies[index] = grpc_generate(mesh, request)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(http) == len(grpc_replies) == len(PROMPTS), "a request failed"
    tokenizer = mesh.mesh.core.tokenizer
    for index, prompt in enumerate(PROMPTS):
        via_grpc = grpc_replies[index]
        assert text_of(http[index]) == via_grpc.text, prompt
        assert http[index].usage.completion_tokens == len(via_grpc.token_ids)
        assert http[index].usage.prompt_tokens == via_grpc.usage.prompt_tokens
        ids = hf_greedy(hf_smol, encode_prompt(tokenizer, prompt), NEW_TOKENS)
        assert list(via_grpc.token_ids) == ids, prompt
        assert text_of(http[index]) == tokenizer.decode(ids, skip_special_tokens=True), prompt


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streaming_adds_up_to_the_whole_answer(client: openai.OpenAI, kind: str) -> None:
    prompt = PROMPTS[1] if kind == "chat" else PROMPTS[0]
    whole = http_greedy(client, prompt, max_tokens=NEW_TOKENS, temperature=0)
    chunks = list(
        http_greedy(
            client, prompt, max_tokens=NEW_TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    *pieces, last = chunks
    if kind == "chat":
        assert pieces[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in pieces)
    else:
        text = "".join(c.choices[0].text for c in pieces)
    assert text == text_of(whole)
    assert pieces[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in pieces[:-1])
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens


def test_the_event_stream_is_data_lines_ending_in_done(base: str) -> None:
    """The wire format itself (the openai client would hide a missing [DONE]), and
    ``max_completion_tokens`` bounding a chat."""
    body = {
        "model": MODEL, "messages": PROMPTS[1], "max_completion_tokens": 5, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", f"{base}/v1/chat/completions", json=body, headers=headers, timeout=120
    ) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        raw = reply.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "", "every event ends with a blank line"
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1]), raw
    datas = [e.removeprefix("data: ") for e in events[:-1]]
    assert datas[-1] == "[DONE]" and "[DONE]" not in datas[:-1]
    *chunks, usage = [json.loads(d) for d in datas[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and len(c["choices"]) == 1 for c in chunks)
    assert all(c["usage"] is None for c in chunks)
    assert len({c["id"] for c in [*chunks, usage]}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    content = [c["choices"][0]["delta"].get("content") or "" for c in chunks]
    assert "".join(content), "some text"


def test_n_seeded_samples_differ_reproduce_and_share_one_prefill(
    mesh: MeshThread, client: openai.OpenAI, base: str
) -> None:
    prompt = "In a quiet harbour town the lighthouse keeper wrote " + "and then " * 20
    cached_before = metric(base, "pdmesh_cached_prompt_tokens_total")
    computed_before = prefill_tokens(mesh)
    args = dict(model=MODEL, prompt=prompt, n=3, seed=5, temperature=1.0, max_tokens=12)
    first = client.completions.create(**args)
    cached = metric(base, "pdmesh_cached_prompt_tokens_total") - cached_before
    computed = prefill_tokens(mesh) - computed_before
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.text for c in first.choices]
    assert len(set(texts)) == 3, "three seeds (5, 6, 7), three different samples"
    assert first.usage.prompt_tokens_details.cached_tokens == 0, "a new prompt"
    assert first.usage.completion_tokens == 36
    # Choices 1 and 2 found every full block of the prompt already computed by choice 0:
    # the prefill worker computed the prompt once, plus its last partial block twice.
    num_prompt = first.usage.prompt_tokens
    block_size = mesh.mesh.core.block_size
    full = (num_prompt - 1) // block_size * block_size
    assert full > 0 and cached >= 2 * full
    assert computed == num_prompt + 2 * (num_prompt - full), (computed, num_prompt, full)
    again = client.completions.create(**args)
    assert [c.text for c in again.choices] == texts


def hf_logprobs(model: torch.nn.Module, prompt_ids: list[int], new_ids: list[int]) -> Any:
    """Hugging Face's log-probabilities of the next token at each of ``new_ids``' positions
    (rows: the generated tokens; columns: the vocabulary)."""
    ids = torch.tensor([prompt_ids + new_ids[:-1]])
    with torch.inference_mode():
        logits = model(ids).logits[0, len(prompt_ids) - 1 :]  # type: ignore[operator]
    return torch.log_softmax(logits.float(), dim=-1)


def test_logprobs_of_chat_and_completions(
    mesh: MeshThread, client: openai.OpenAI, hf_smol: torch.nn.Module
) -> None:
    """The chosen token's and the top alternatives' log-probabilities, against HF's."""
    tokenizer = mesh.mesh.core.tokenizer
    chat = client.chat.completions.create(
        model=MODEL, messages=PROMPTS[1], max_tokens=8, temperature=0, logprobs=True,
        top_logprobs=3,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    prompt_ids = encode_prompt(tokenizer, PROMPTS[1])
    ids = hf_greedy(hf_smol, prompt_ids, 8)[: len(content)]
    reference = hf_logprobs(hf_smol, prompt_ids, ids)
    for row, token_id, entry in zip(reference, ids, content, strict=True):
        assert entry.token == tokenizer.decode([token_id])
        assert bytes(entry.bytes).decode() == entry.token
        assert entry.logprob == pytest.approx(float(row[token_id]), abs=5e-3)
        best = row.topk(3)
        got = [t.logprob for t in entry.top_logprobs]
        assert got == pytest.approx(best.values.tolist(), abs=5e-3)
        want = [tokenizer.decode([int(i)]) for i in best.indices]
        assert [t.token for t in entry.top_logprobs] == want
    text = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=2
    )
    logprobs = text.choices[0].logprobs
    assert "".join(logprobs.tokens) == text.choices[0].text
    assert len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 8
    prompt_ids = encode_prompt(tokenizer, PROMPTS[0])
    ids = hf_greedy(hf_smol, prompt_ids, 8)
    reference = hf_logprobs(hf_smol, prompt_ids, ids)
    for row, token_id, logprob, top in zip(
        reference, ids, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert logprob == pytest.approx(float(row[token_id]), abs=5e-3)
        best = row.topk(2)
        want = {tokenizer.decode([int(i)]): float(v) for v, i in zip(*best, strict=True)}
        assert top == pytest.approx(want, abs=5e-3)
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0


def test_stop_strings_end_the_text_before_them(client: openai.OpenAI) -> None:
    whole = http_greedy(client, PROMPTS[0], max_tokens=NEW_TOKENS, temperature=0)
    assert whole.choices[0].finish_reason == "length"
    text = text_of(whole)
    cut = text[2 : text.index(" ", 3)] if " " in text[3:] else text[2:4]
    for stop in (cut, [cut, "never-there"]):
        stopped = http_greedy(client, PROMPTS[0], max_tokens=NEW_TOKENS, temperature=0, stop=stop)
        assert stopped.choices[0].finish_reason == "stop"
        assert text_of(stopped) == text[: text.index(cut)]


def test_a_repeated_long_prompt_reports_cached_tokens(
    mesh: MeshThread, client: openai.OpenAI
) -> None:
    story = " ".join(f"Line {i}: the tide came in over the stones." for i in range(30))
    messages = [{"role": "user", "content": story}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    prompt_tokens = second.usage.prompt_tokens
    block_size = mesh.mesh.core.block_size
    assert first.usage.prompt_tokens == prompt_tokens > 8 * block_size
    assert first.usage.prompt_tokens_details.cached_tokens < block_size * 2  # template only
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert (prompt_tokens - 1) // block_size * block_size <= cached < prompt_tokens


def test_penalties_and_vllm_fields_reach_the_sampler_as_on_grpc(
    mesh: MeshThread, client: openai.OpenAI
) -> None:
    fields = dict(presence_penalty=0.8, frequency_penalty=1.2, temperature=0)
    extra = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True}
    http = client.completions.create(
        model=MODEL, prompt=PROMPTS[2], max_tokens=NEW_TOKENS, extra_body=extra, **fields
    )
    request = to_request(PROMPTS[2], max_tokens=NEW_TOKENS, **fields, **extra)
    assert text_of(http) == grpc_generate(mesh, request).text
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=NEW_TOKENS)
    assert text_of(plain) != text_of(http)
    # temperature, top_p and seed: a seeded sample is the gRPC path's, and a nucleus of
    # almost nothing leaves only the most likely token (the greedy answer).
    sampled = dict(temperature=1.0, top_p=0.9, seed=3)
    http_sampled = client.completions.create(
        model=MODEL, prompt=PROMPTS[2], max_tokens=NEW_TOKENS, **sampled
    )
    request = to_request(PROMPTS[2], max_tokens=NEW_TOKENS, **sampled)
    assert text_of(http_sampled) == grpc_generate(mesh, request).text
    greedy = http_greedy(client, PROMPTS[2], max_tokens=NEW_TOKENS, temperature=0)
    nucleus = client.completions.create(
        model=MODEL, prompt=PROMPTS[2], max_tokens=NEW_TOKENS, temperature=1.0, top_p=1e-6, seed=3
    )
    assert text_of(nucleus) == text_of(greedy) != text_of(http_sampled)
    assert http.usage.completion_tokens == NEW_TOKENS and http.choices[0].finish_reason == "length"
    # stop_token_ids: the first greedy token ends it.
    first_token = grpc_generate(mesh, to_request(PROMPTS[2], max_tokens=1, temperature=0))
    stopped = client.completions.create(
        model=MODEL, prompt=PROMPTS[2], max_tokens=8, temperature=0,
        extra_body={"stop_token_ids": list(first_token.token_ids)},
    )  # fmt: skip
    assert stopped.usage.completion_tokens == 1 and stopped.choices[0].finish_reason == "stop"


def test_bad_input_is_400_naming_the_field_as_grpc_does(
    mesh: MeshThread, client: openai.OpenAI, base: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=MODEL, prompt="x", extra_body={"temperature": "hot"})
    error = raised_error(raised, 400)
    assert error["param"] == "temperature" and error["type"] == "invalid_request_error"
    assert "temperature must be a number" in error["message"]
    too_long = mesh.mesh.core.max_model_len + 5
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=MODEL, prompt="x", max_tokens=too_long)
    with pytest.raises(grpc.RpcError) as grpc_error:
        grpc_generate(mesh, to_request("x", max_tokens=too_long))
    assert grpc_error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised_error(raised, 400)["message"] == grpc_error.value.details()
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.role") as raised:
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])
    assert raised_error(raised, 400)["type"] == "invalid_request_error"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    not_json = httpx.post(f"{base}/v1/completions", content=b"{", headers=headers, timeout=30)
    assert openai_error(not_json, 400)["param"] == "body"
    ignored = client.completions.create(
        model=MODEL, prompt="x", max_tokens=2, extra_body={"not_a_field": {"a": 1}}
    )
    assert ignored.usage.completion_tokens == 2, "unknown fields are ignored"


def test_api_keys_guard_v1_but_not_health(mesh: MeshThread, base: str) -> None:
    wrong = openai.OpenAI(
        base_url=f"{base}/v1", api_key="sk-wrong-0123456789abcdef01234567", max_retries=0
    )
    for call in (
        lambda: wrong.completions.create(model=MODEL, prompt="x", max_tokens=2),
        lambda: wrong.models.list(),
    ):
        with pytest.raises(openai.AuthenticationError) as raised:
            call()
        error = raised_error(raised, 401)
        assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"
    # The openai client always sends a key: without one, a plain HTTP call.
    missing = httpx.post(f"{base}/v1/completions", json={"prompt": "x"}, timeout=30)
    assert "missing API key" in openai_error(missing, 401)["message"]
    # The gRPC port refuses the same wrong key.
    with pytest.raises(grpc.RpcError) as grpc_error:
        list(
            mesh.stub.Generate(
                to_request("x", max_tokens=2), timeout=30,
                metadata=(("authorization", "Bearer sk-wrong-0123456789abcdef01234567"),),
            )
        )  # fmt: skip
    assert grpc_error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert httpx.get(f"{base}/health", timeout=30).json() == {"status": "ok"}


def test_an_oversized_body_is_413(base: str) -> None:
    body = {"model": MODEL, "prompt": "x" * (MAX_REQUEST_BYTES + 1)}
    reply = httpx.post(
        f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert openai_error(reply, 413)["code"] == "request_too_large"


def test_overload_is_429_and_draining_is_503(
    mesh: MeshThread, client: openai.OpenAI, base: str
) -> None:
    admission = mesh.mesh.core.admission
    long = dict(model=MODEL, prompt="Count:", max_tokens=200, extra_body={"ignore_eos": True})
    stream = client.completions.create(stream=True, **long)
    next(iter(stream))  # one request in flight
    admission.max_in_flight = 1
    try:
        with pytest.raises(openai.RateLimitError) as raised:
            client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        error = raised_error(raised, 429)
        assert (error["type"], error["code"]) == ("rate_limit_error", "overloaded")
    finally:
        admission.max_in_flight = 1024
        stream.close()
    admission.is_draining = True
    try:
        with pytest.raises(openai.InternalServerError) as raised:
            client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert raised_error(raised, 503)["code"] == "unavailable"
        # A draining gateway is not a serving path: load balancers take it out.
        health = httpx.get(f"{base}/health", timeout=30)
        assert (health.status_code, health.json()) == (503, {"status": "unavailable"})
    finally:
        admission.is_draining = False
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200
    mesh.wait_idle()
    assert mesh.is_idle()


def test_a_deadline_is_504_and_frees_everything(mesh: MeshThread, client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as raised:
        client.completions.create(
            model=MODEL, prompt="Count:", max_tokens=400, extra_body={"ignore_eos": True},
            extra_headers={"x-request-timeout": "0.5"},
        )  # fmt: skip
    error = raised_error(raised, 504)
    assert (error["type"], error["code"]) == ("timeout_error", "deadline_exceeded")
    mesh.wait_idle()
    assert mesh.is_idle()


def test_a_client_gone_mid_stream_leaves_no_blocks_or_pins(
    mesh: MeshThread, client: openai.OpenAI, base: str
) -> None:
    aborted = metric(base, "pdmesh_requests_total", status="abort")
    stream = client.chat.completions.create(
        model=MODEL, messages=PROMPTS[1], max_tokens=400, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = iter(stream)
    next(chunks), next(chunks)
    assert not mesh.is_idle()
    stream.close()
    # And a whole-answer request whose client times out.
    impatient = client.with_options(timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(
            model=MODEL, prompt="Count:", max_tokens=400, extra_body={"ignore_eos": True}
        )
    mesh.wait_idle(timeout=90)
    pins = mesh.mesh.store.stats().num_pinned_blocks
    assert mesh.is_idle(), ([r.num_used_blocks for r in mesh.loads()], pins)
    assert metric(base, "pdmesh_requests_total", status="abort") - aborted == 2
    assert metric(base, "pdmesh_rpc_requests_total", method="ChatCompletions", code="499") >= 1


def test_an_unknown_route_or_method_is_an_openai_error(base: str) -> None:
    assert openai_error(httpx.get(f"{base}/v1/engines", timeout=30), 404)["code"] == "not_found"
    wrong_method = httpx.get(f"{base}/v1/chat/completions", timeout=30)
    assert openai_error(wrong_method, 405)["type"] == "invalid_request_error"


def readme_block(language: str, first_line: str) -> str:
    """The README's ``language`` code block that starts with ``first_line``."""
    pattern = rf"```{language}\n({re.escape(first_line)}.*?)\n```"
    match = re.search(pattern, README.read_text(), re.S)
    assert match is not None, f"README has no {language} block starting {first_line!r}"
    return match.group(1)


def test_the_readme_curl_and_openai_examples_work(base: str) -> None:
    """The README's two HTTP examples, pointed at this mesh and given its key."""
    address = base.removeprefix("http://")
    curl = readme_block("bash", "curl -s 127.0.0.1:8080/v1/chat/completions")
    curl = curl.replace("127.0.0.1:8080", address) + f" -H 'Authorization: Bearer {KEY}'"
    reply = json.loads(subprocess.run(["bash", "-c", curl], capture_output=True, check=True).stdout)
    assert reply["object"] == "chat.completion" and reply["model"] == MODEL
    assert reply["choices"][0]["message"]["content"]
    assert 0 < reply["usage"]["completion_tokens"] <= 32
    python = readme_block("python", "from openai import OpenAI")
    assert '"unused-without-keys"' in python and "http://127.0.0.1:8080/v1" in python
    python = python.replace("http://127.0.0.1:8080/v1", f"{base}/v1")
    python = python.replace('"unused-without-keys"', repr(KEY))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(python, str(README), "exec"), {})  # the README's own code
    assert printed.getvalue().strip(), "the streamed answer is printed"


def test_no_decode_worker_is_503_and_health_says_so(
    mesh: MeshThread, client: openai.OpenAI, base: str
) -> None:
    """Last: it kills the decode worker."""
    mesh.kill_worker(1)
    for _ in range(100):
        if httpx.get(f"{base}/health", timeout=30).status_code == 503:
            break
        threading.Event().wait(0.1)
    assert httpx.get(f"{base}/health", timeout=30).status_code == 503
    with pytest.raises(openai.InternalServerError) as raised:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    error = raised_error(raised, 503)
    assert "no healthy decode worker" in error["message"]
    assert (error["type"], error["code"]) == ("service_unavailable_error", "unavailable")
