"""Turns a public GenerateRequest into token ids and SamplingParams, or a clear error."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.tokenizer import encode_prompt
from pdmesh.v1 import generation_pb2 as gen_pb
from serving.convert import sampling_from_pb
from serving.request_ids import check_request_id

MAX_PROMPT_CHARS = 1 << 20
MAX_MESSAGES = 4096
CHAT_ROLES = ("system", "user", "assistant")
#: Float fields that must hold a finite number when set (NaN and infinities are refused).
FLOAT_FIELDS = (
    "temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"
)


@dataclass(frozen=True)
class ValidRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    #: Scheduling priority, lower first (workers under the ``priority`` policy use it).
    priority: int = 0


def prompt_ids_of(tokenizer: Any, request: Any) -> list[int]:
    """Exactly one of prompt, messages or prompt_token_ids (GenerateRequest or TokenizeRequest)."""
    has_ids = bool(getattr(request, "prompt_token_ids", None))
    given = [request.HasField("prompt"), bool(request.messages), has_ids]
    if sum(given) != 1:
        raise InvalidRequestError("set exactly one of prompt, messages or prompt_token_ids")
    if has_ids:
        return list(request.prompt_token_ids)
    if request.HasField("prompt"):
        if not request.prompt:
            raise InvalidRequestError("prompt is empty")
        if len(request.prompt) > MAX_PROMPT_CHARS:
            raise InvalidRequestError(f"prompt is longer than {MAX_PROMPT_CHARS} characters")
        return encode_prompt(tokenizer, request.prompt)
    if len(request.messages) > MAX_MESSAGES:
        raise InvalidRequestError(
            f"{len(request.messages)} messages; at most {MAX_MESSAGES} are accepted"
        )
    for index, message in enumerate(request.messages):
        if message.role not in CHAT_ROLES:
            raise InvalidRequestError(
                f"messages[{index}].role is {message.role!r}; it must be one of "
                f"{', '.join(CHAT_ROLES)}"
            )
    if sum(len(m.content) for m in request.messages) > MAX_PROMPT_CHARS:
        raise InvalidRequestError(f"messages hold more than {MAX_PROMPT_CHARS} characters")
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    return encode_prompt(tokenizer, messages)


def _check_token_ids(field_name: str, token_ids: Any, vocab_size: int) -> None:
    for index, token_id in enumerate(token_ids):
        if not 0 <= token_id < vocab_size:
            raise InvalidRequestError(
                f"{field_name}[{index}] = {token_id}: token ids must be in [0, {vocab_size})"
            )


def _check_fields(request: gen_pb.GenerateRequest, max_model_len: int) -> None:
    """What can be refused before the prompt is tokenized."""
    if request.request_id:
        check_request_id(request.request_id)
    for name in FLOAT_FIELDS:
        value = getattr(request, name)
        if request.HasField(name) and not math.isfinite(value):
            raise InvalidRequestError(f"{name} must be a finite number, got {value}")
    if request.HasField("max_tokens") and request.max_tokens >= max_model_len:
        raise InvalidRequestError(
            f"max_tokens ({request.max_tokens}) exceeds the maximum model length "
            f"{max_model_len} (the context holds the prompt and the output)"
        )
    if len(request.prompt_token_ids) >= max_model_len:
        raise InvalidRequestError(
            f"prompt_token_ids has {len(request.prompt_token_ids)} tokens; the maximum model "
            f"length is {max_model_len} and leaves no room for output"
        )


def validate(
    request: gen_pb.GenerateRequest, tokenizer: Any, vocab_size: int, max_model_len: int
) -> ValidRequest:
    _check_fields(request, max_model_len)
    prompt_ids = prompt_ids_of(tokenizer, request)
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty")
    _check_token_ids("prompt_token_ids", prompt_ids, vocab_size)
    _check_token_ids("stop_token_ids", request.stop_token_ids, vocab_size)
    if len(prompt_ids) >= max_model_len:
        raise InvalidRequestError(
            f"the prompt is {len(prompt_ids)} tokens; the maximum model length is "
            f"{max_model_len} and leaves no room for output"
        )
    params = sampling_from_pb(request)
    if len(prompt_ids) + params.max_tokens > max_model_len:
        raise InvalidRequestError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
            f"the maximum model length {max_model_len}"
        )
    request_id = request.request_id or uuid.uuid4().hex
    return ValidRequest(request_id, prompt_ids, params, request.priority)
