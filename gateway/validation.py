"""Turns a public GenerateRequest into token ids and SamplingParams, or a clear error."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.tokenizer import encode_prompt
from pdmesh.v1 import generation_pb2 as gen_pb

MAX_PROMPT_CHARS = 1 << 20


@dataclass(frozen=True)
class ValidRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


def _optional(message: Any, name: str, default: Any) -> Any:
    return getattr(message, name) if message.HasField(name) else default


def prompt_ids_of(tokenizer: Any, request: Any) -> list[int]:
    """Exactly one of prompt, messages or prompt_token_ids (GenerateRequest or TokenizeRequest)."""
    has_ids = bool(getattr(request, "prompt_token_ids", None))
    given = [request.HasField("prompt"), bool(request.messages), has_ids]
    if sum(given) != 1:
        raise InvalidRequestError("set exactly one of prompt, messages or prompt_token_ids")
    if has_ids:
        return list(request.prompt_token_ids)
    if request.HasField("prompt"):
        if len(request.prompt) > MAX_PROMPT_CHARS:
            raise InvalidRequestError(f"prompt is longer than {MAX_PROMPT_CHARS} characters")
        return encode_prompt(tokenizer, request.prompt)
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    if any(m["role"] not in ("system", "user", "assistant") for m in messages):
        raise InvalidRequestError("message roles must be system, user or assistant")
    return encode_prompt(tokenizer, messages)


def validate(
    request: gen_pb.GenerateRequest, tokenizer: Any, vocab_size: int, max_model_len: int
) -> ValidRequest:
    prompt_ids = prompt_ids_of(tokenizer, request)
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty")
    if any(not 0 <= t < vocab_size for t in prompt_ids):
        raise InvalidRequestError(f"prompt token ids must be in [0, {vocab_size})")
    params = SamplingParams(
        max_tokens=_optional(request, "max_tokens", 16),
        temperature=_optional(request, "temperature", 1.0),
        top_p=_optional(request, "top_p", 1.0),
        top_k=_optional(request, "top_k", 0),
        min_p=_optional(request, "min_p", 0.0),
        repetition_penalty=_optional(request, "repetition_penalty", 1.0),
        seed=_optional(request, "seed", None),
        stop=tuple(request.stop),
        stop_token_ids=tuple(request.stop_token_ids),
        ignore_eos=request.ignore_eos,
        logprobs=_optional(request, "logprobs", None),
    )
    if len(prompt_ids) + params.max_tokens > max_model_len:
        raise InvalidRequestError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
            f"the maximum model length {max_model_len}"
        )
    return ValidRequest(request.request_id or uuid.uuid4().hex, prompt_ids, params)
