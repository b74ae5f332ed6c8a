"""OpenAI request bodies become the gateway's GenerateRequest, or a FieldError naming the
field (no mesh needed)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.openai_schema import FieldError, choice_message, parse_chat, parse_completion

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_chat_fields_map_onto_the_grpc_request() -> None:
    parsed = parse_chat(
        {
            **CHAT,
            "max_completion_tokens": 7, "max_tokens": 99, "temperature": 0, "top_p": 0.9,
            "stop": "END", "presence_penalty": 0.5, "frequency_penalty": -0.5, "top_k": -1,
            "min_p": 0.1, "repetition_penalty": 1.2, "ignore_eos": True,
            "stop_token_ids": [3, 4], "logprobs": True, "top_logprobs": 2, "n": 2, "seed": 9,
            "stream": True, "stream_options": {"include_usage": True}, "some_new_field": [1],
            "priority": -3,
        }
    )  # fmt: skip
    message = parsed.message
    assert message.max_tokens == 7, "max_completion_tokens wins over the deprecated max_tokens"
    assert list(message.stop) == ["END"] and list(message.stop_token_ids) == [3, 4]
    assert message.top_k == 0 and message.logprobs == 2 and message.ignore_eos
    assert message.priority == -3 and parse_chat(CHAT).message.priority == 0
    assert message.presence_penalty == pytest.approx(0.5)
    assert message.frequency_penalty == pytest.approx(-0.5)
    assert [(m.role, m.content) for m in message.messages] == [("user", "hi")]
    assert (parsed.n, parsed.seed, parsed.stream, parsed.include_usage) == (2, 9, True, True)
    seeds = [choice_message(parsed, "r", i) for i in range(2)]
    assert [(c.request_id, c.seed) for c in seeds] == [("r-0", 9), ("r-1", 10)]


def test_text_parts_and_the_developer_role() -> None:
    parsed = parse_chat(
        {"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                        {"type": "text", "text": "b"}]}]}
    )  # fmt: skip
    assert [(m.role, m.content) for m in parsed.message.messages] == [("system", "ab")]
    assert parsed.model is None and parsed.n == 1 and not parsed.stream


@pytest.mark.parametrize(
    ("prompt", "text", "ids"),
    [("hello", "hello", []), (["hello"], "hello", []), ([5, 6], None, [5, 6]), ([[7]], None, [7])],
)
def test_completion_prompts(prompt: Any, text: str | None, ids: list[int]) -> None:
    message = parse_completion({"prompt": prompt, "logprobs": 3}).message
    assert (message.prompt if message.HasField("prompt") else None) == text
    assert list(message.prompt_token_ids) == ids and message.logprobs == 3


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**CHAT, "temperature": "hot"}, "temperature"),
        ({**CHAT, "max_tokens": 1.5}, "max_tokens"),
        ({**CHAT, "stream": "yes"}, "stream"),
        ({**CHAT, "n": True}, "n"),
        ({**CHAT, "n": 0}, "n"),
        ({**CHAT, "priority": "high"}, "priority"),
        ({**CHAT, "priority": 1.5}, "priority"),
        ({**CHAT, "priority": True}, "priority"),
        ({**CHAT, "priority": 1 << 31}, "priority"),
        ({**CHAT, "stop": [1]}, "stop"),
        ({**CHAT, "top_logprobs": 2}, "top_logprobs"),
        ({**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({**CHAT, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content"),
        ([1, 2], "body"),
    ],
)  # fmt: skip
def test_wrong_chat_fields_are_named(body: Any, param: str) -> None:
    with pytest.raises(FieldError) as raised:
        parse_chat(body)
    assert raised.value.param == param and param.split("[")[0].split(".")[0] in str(raised.value)


@pytest.mark.parametrize(
    ("body", "param"),
    [({"prompt": []}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": 3}, "prompt"),
     ({"prompt": "a", "logprobs": True}, "logprobs"), ({"prompt": "a", "echo": True}, "echo"),
     ({"prompt": "a", "priority": "1"}, "priority")],
)  # fmt: skip
def test_wrong_completion_fields_are_named(body: Any, param: str) -> None:
    with pytest.raises(FieldError) as raised:
        parse_completion(body)
    assert raised.value.param == param
