"""The gateway's GenerateResponse pieces as OpenAI JSON: whole responses, stream chunks,
usage and logprobs of chat and completions."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from gateway.openai_schema import OpenAIRequest
from pdmesh.v1 import generation_pb2 as gen_pb

FINISH_REASONS = {gen_pb.FINISH_REASON_STOP: "stop", gen_pb.FINISH_REASON_LENGTH: "length"}


@dataclass
class Choice:
    """One choice as it grows."""

    index: int
    text: str = ""
    num_tokens: int = 0
    logprobs: list[gen_pb.TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    usage: gen_pb.Usage | None = None

    def add(self, piece: gen_pb.GenerateResponse) -> None:
        self.text += piece.text
        self.num_tokens += len(piece.token_ids)
        self.logprobs.extend(piece.logprobs)
        if piece.finish_reason:
            self.finish_reason = FINISH_REASONS.get(piece.finish_reason)
        if piece.HasField("usage"):
            self.usage = piece.usage


class TokenText:
    """Token ids as the text OpenAI's logprobs show (one token decoded alone), cached."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.text = functools.lru_cache(maxsize=65536)(self._decode)

    def _decode(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))

    def entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def chat_logprobs(tokens: TokenText, logprobs: list[gen_pb.TokenLogprob]) -> dict[str, Any]:
    content = []
    for item in logprobs:
        entry = tokens.entry(item.token_id, item.logprob)
        entry["top_logprobs"] = [tokens.entry(t.token_id, t.logprob) for t in item.top]
        content.append(entry)
    return {"content": content}


def completion_logprobs(
    tokens: TokenText, logprobs: list[gen_pb.TokenLogprob], offset: int = 0
) -> dict[str, Any]:
    """The legacy shape: parallel lists; ``offset`` is the text length before these tokens."""
    texts = [tokens.text(item.token_id) for item in logprobs]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [item.logprob for item in logprobs],
        "top_logprobs": [
            {tokens.text(t.token_id): t.logprob for t in item.top} for item in logprobs
        ],
        "text_offset": offsets,
    }


def usage_json(choices: list[Choice]) -> dict[str, Any]:
    """Prompt counted once (the n choices share it), completions summed; the cached tokens
    are the first choice's, the prompt as the request found it."""
    first = choices[0].usage or gen_pb.Usage()
    completion = sum(c.num_tokens for c in choices)
    return {
        "prompt_tokens": first.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": first.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": first.cached_tokens},
    }


@dataclass(frozen=True)
class Envelope:
    """What every body of one response repeats."""

    id: str
    created: int
    model: str
    request: OpenAIRequest
    tokens: TokenText

    @property
    def is_chat(self) -> bool:
        return self.request.kind == "chat"

    def _head(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def _logprobs(self, logprobs: list[gen_pb.TokenLogprob], offset: int = 0) -> Any:
        if not self.request.logprobs:
            return None
        if self.is_chat:
            return chat_logprobs(self.tokens, logprobs)
        return completion_logprobs(self.tokens, logprobs, offset)

    def whole(self, choices: list[Choice]) -> dict[str, Any]:
        body = self._head("chat.completion" if self.is_chat else "text_completion")
        body["choices"] = [self._whole_choice(c) for c in choices]
        body["usage"] = usage_json(choices)
        return body

    def _whole_choice(self, choice: Choice) -> dict[str, Any]:
        out: dict[str, Any] = {"index": choice.index}
        if self.is_chat:
            out["message"] = {"role": "assistant", "content": choice.text}
        else:
            out["text"] = choice.text
        out["logprobs"] = self._logprobs(choice.logprobs)
        out["finish_reason"] = choice.finish_reason
        return out

    def chunk(
        self, choice: Choice, piece: gen_pb.GenerateResponse, first: bool, offset: int
    ) -> dict[str, Any]:
        """One stream chunk of ``choice`` for ``piece`` (already added to it); ``first``
        chat chunks open the assistant message; ``offset``: the choice's text length before."""
        body = self._head("chat.completion.chunk" if self.is_chat else "text_completion")
        out: dict[str, Any] = {"index": choice.index}
        if self.is_chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if piece.text or first:
                delta["content"] = piece.text
            out["delta"] = delta
        else:
            out["text"] = piece.text
        out["logprobs"] = self._logprobs(list(piece.logprobs), offset)
        out["finish_reason"] = FINISH_REASONS.get(piece.finish_reason)
        body["choices"] = [out]
        if self.request.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, choices: list[Choice]) -> dict[str, Any]:
        body = self._head("chat.completion.chunk" if self.is_chat else "text_completion")
        body["choices"] = []
        body["usage"] = usage_json(choices)
        return body
