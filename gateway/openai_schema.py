"""OpenAI request bodies (chat and completions) to the gateway's own GenerateRequest.

Only the shape is checked here (types, ranges the proto cannot hold, OpenAI-only rules);
everything else is the gRPC path's validation, so both front ends refuse a request with the
same field-naming message. Unknown fields are ignored, as OpenAI's clients send new ones
before every server knows them; a known field of the wrong type is refused, naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.errors import InvalidRequestError
from pdmesh.v1 import generation_pb2 as gen_pb

MAX_CHOICES = 16
#: Top alternatives OpenAI allows: chat ``top_logprobs`` and completions ``logprobs``.
MAX_TOP_LOGPROBS = 20
#: ``priority`` travels as a proto int32.
PRIORITY_RANGE = (-(1 << 31), (1 << 31) - 1)
#: OpenAI's "developer" role is its newer name for "system".
ROLE_ALIASES = {"developer": "system"}


class FieldError(InvalidRequestError):
    """A request field that cannot be used; ``param`` names it for the error body."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class OpenAIRequest:
    """One chat or completions call: the GenerateRequest every choice starts from, and what
    only the HTTP answer needs."""

    #: "chat" or "completion".
    kind: str
    #: The ``model`` field (None when the client sent none).
    model: str | None
    #: Without request id and seed: each choice gets its own.
    message: gen_pb.GenerateRequest
    n: int
    seed: int | None
    stream: bool
    include_usage: bool
    #: Chat: report logprobs; completions: report them (with ``message.logprobs`` top ones).
    logprobs: bool


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (_is_int, "an integer"),
    "number": (_is_number, "a number"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "int_list": (lambda v: isinstance(v, list) and all(map(_is_int, v)), "a list of integers"),
}
#: The fields both endpoints read, by kind. ``null`` is the same as absent for every one.
COMMON_FIELDS = {
    "model": "str",
    "max_tokens": "int",
    "temperature": "number",
    "top_p": "number",
    "n": "int",
    "seed": "int",
    "stream": "bool",
    "stream_options": "object",
    "presence_penalty": "number",
    "frequency_penalty": "number",
    # vLLM's extra sampling fields.
    "top_k": "int",
    "min_p": "number",
    "repetition_penalty": "number",
    "ignore_eos": "bool",
    "stop_token_ids": "int_list",
    # vLLM's scheduling priority (lower first).
    "priority": "int",
}
CHAT_FIELDS = {
    **COMMON_FIELDS,
    "max_completion_tokens": "int",
    "logprobs": "bool",
    "top_logprobs": "int",
}
COMPLETION_FIELDS = {**COMMON_FIELDS, "logprobs": "int", "echo": "bool"}
#: Fields copied to the GenerateRequest under the same name when set.
SAMPLING_FIELDS = (
    "temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "ignore_eos", "stop_token_ids",
)  # fmt: skip


def _fields(body: Any, kinds: dict[str, str]) -> dict[str, Any]:
    """The known fields that are set (not null), each checked for its kind."""
    if not isinstance(body, dict):
        raise FieldError("body", "the request body must be a JSON object")
    values = {}
    for name, kind in kinds.items():
        value = body.get(name)
        if value is None:
            continue
        check, wanted = KINDS[kind]
        if not check(value):
            raise FieldError(name, f"{name} must be {wanted}, got {value!r}")
        values[name] = value
    return values


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise FieldError("stop", f"stop must be a string or a list of strings, got {stop!r}")


def _common(body: dict[str, Any], values: dict[str, Any]) -> gen_pb.GenerateRequest:
    message = gen_pb.GenerateRequest(stop=_stop(body))
    for name in SAMPLING_FIELDS:
        if name == "stop_token_ids":
            message.stop_token_ids.extend(values.get(name, ()))
        elif name in values:
            setattr(message, name, values[name])
    if "top_k" in values:  # vLLM: -1 disables, as 0 does here
        message.top_k = 0 if values["top_k"] == -1 else values["top_k"]
    if "priority" in values:
        low, high = PRIORITY_RANGE
        if not low <= values["priority"] <= high:
            raise FieldError("priority", f"priority must be in [{low}, {high}]")
        message.priority = values["priority"]
    n = values.get("n", 1)
    if not 1 <= n <= MAX_CHOICES:
        raise FieldError("n", f"n must be in [1, {MAX_CHOICES}], got {n}")
    return message


def _request(
    kind: str, values: dict[str, Any], message: gen_pb.GenerateRequest, logprobs: bool
) -> OpenAIRequest:
    stream = values.get("stream", False)
    options = values.get("stream_options") or {}
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise FieldError(
            "stream_options.include_usage",
            f"stream_options.include_usage must be a boolean, got {include_usage!r}",
        )
    return OpenAIRequest(
        kind=kind,
        model=values.get("model"),
        message=message,
        n=values.get("n", 1),
        seed=values.get("seed"),
        stream=stream,
        include_usage=stream and include_usage,
        logprobs=logprobs,
    )


def _content(index: int, content: Any) -> str:
    """A message's text: a string, or a list of text parts (other parts are refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise FieldError(
                    f"messages[{index}].content",
                    f"messages[{index}].content: only text parts are supported",
                )
            if not isinstance(part.get("text"), str):
                raise FieldError(
                    f"messages[{index}].content",
                    f"messages[{index}].content: a text part needs a string text",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise FieldError(
        f"messages[{index}].content",
        f"messages[{index}].content must be a string or a list of text parts",
    )


def _messages(body: dict[str, Any]) -> list[gen_pb.ChatMessage]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise FieldError("messages", "messages must be a non-empty list of chat messages")
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise FieldError(
                f"messages[{index}]", f"messages[{index}] must be an object with a string role"
            )
        role = ROLE_ALIASES.get(message["role"], message["role"])
        content = _content(index, message.get("content") or "")
        turns.append(gen_pb.ChatMessage(role=role, content=content))
    return turns


def parse_chat(body: Any) -> OpenAIRequest:
    values = _fields(body, CHAT_FIELDS)
    message = _common(body, values)
    message.messages.extend(_messages(body))
    max_tokens = values.get("max_completion_tokens", values.get("max_tokens"))
    if max_tokens is not None:
        message.max_tokens = max_tokens
    wants_logprobs = values.get("logprobs", False)
    if "top_logprobs" in values:
        top = values["top_logprobs"]
        if not wants_logprobs:
            raise FieldError("top_logprobs", "top_logprobs needs logprobs set to true")
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise FieldError(
                "top_logprobs", f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}"
            )
    if wants_logprobs:
        message.logprobs = values.get("top_logprobs", 0)
    return _request("chat", values, message, wants_logprobs)


def _prompt(body: dict[str, Any], message: gen_pb.GenerateRequest) -> None:
    """A string or a list of token ids; a list holding exactly one of them is the same."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        message.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(map(_is_int, prompt)):
        message.prompt_token_ids.extend(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise FieldError("prompt", "prompt: one prompt per request (use n for more samples)")
    else:
        raise FieldError(
            "prompt", "prompt must be a non-empty string or a non-empty list of token ids"
        )


def parse_completion(body: Any) -> OpenAIRequest:
    values = _fields(body, COMPLETION_FIELDS)
    message = _common(body, values)
    _prompt(body, message)
    if values.get("echo"):
        raise FieldError("echo", "echo is not supported")
    if "max_tokens" in values:
        message.max_tokens = values["max_tokens"]
    if "logprobs" in values:
        top = values["logprobs"]
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise FieldError("logprobs", f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
        message.logprobs = top
    return _request("completion", values, message, "logprobs" in values)


def choice_message(request: OpenAIRequest, request_id: str, index: int) -> gen_pb.GenerateRequest:
    """Choice ``index`` of ``request``: its own id, and its own seed (seed + index) so n
    seeded samples differ from each other yet each reproduces."""
    message = gen_pb.GenerateRequest()
    message.CopyFrom(request.message)
    message.request_id = request_id if request.n == 1 else f"{request_id}-{index}"
    if request.seed is not None:
        message.seed = request.seed + index
    return message
