"""Offline, in-process API: ``LLM(...).generate(prompts, params)`` with continuous batching."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Union, cast

from engine.config import EngineConfig
from engine.engine import Engine, StepOutput
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason, TokenLogprob
from engine.text_output import TextStream
from engine.tokenizer import encode_prompt, load_tokenizer

ChatMessages = list[dict[str, str]]
#: Text, chat messages, or token ids.
Prompt = Union[str, ChatMessages, list[int]]


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Tracked:
    output: RequestOutput
    stream: TextStream


def _is_token_ids(prompt: Prompt) -> bool:
    return isinstance(prompt, list) and all(isinstance(t, int) for t in prompt) and bool(prompt)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (text or token ids) or several; a list of dicts is one chat."""
    if isinstance(prompts, str) or _is_token_ids(prompts):  # type: ignore[arg-type]
        return [cast(Prompt, prompts)]
    if isinstance(prompts, list) and prompts and isinstance(prompts[0], dict):
        return [cast(Prompt, prompts)]
    return list(cast(Sequence[Prompt], prompts))


class LLM:
    def __init__(self, config: EngineConfig | None = None, **overrides: Any) -> None:
        self.engine = Engine(config or EngineConfig.from_env(**overrides))
        self.tokenizer = load_tokenizer(self.engine.source)
        self._tracked: dict[str, _Tracked] = {}

    def encode(self, prompt: Prompt) -> list[int]:
        if _is_token_ids(prompt):
            return list(prompt)  # type: ignore[arg-type]
        return encode_prompt(self.tokenizer, prompt)  # type: ignore[arg-type]

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
    ) -> str:
        prompt_ids = self.encode(prompt)
        request_id = self.engine.add_request(prompt_ids, params, request_id, priority=priority)
        stream = TextStream.for_request(
            self.tokenizer, prompt_ids, params.stop, params.skip_special_tokens
        )
        self._tracked[request_id] = _Tracked(RequestOutput(request_id, prompt_ids), stream)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Ends a request early; its blocks are freed at once."""
        self._tracked.pop(request_id, None)
        return self.engine.abort(request_id)

    def step(self) -> list[tuple[RequestOutput, str]]:
        """One engine step; returns (output so far, new text) for each request that moved."""
        results = []
        for step_output in self.engine.step():
            tracked = self._tracked[step_output.request_id]
            delta = self._apply(tracked, step_output)
            results.append((tracked.output, delta))
            if tracked.output.finished:
                del self._tracked[step_output.request_id]
        return results

    def _apply(self, tracked: _Tracked, step: StepOutput) -> str:
        out = tracked.output
        out.token_ids.extend(step.new_token_ids)
        out.logprobs.extend(step.new_logprobs)
        out.num_cached_tokens = step.num_cached_tokens
        delta = tracked.stream.add(step.new_token_ids, finished=step.finish_reason is not None)
        out.text += delta
        if step.finish_reason is not None:
            out.finish_reason = step.finish_reason.value
        elif tracked.stream.stopped:
            # A stop string ended the text: end the request and free its blocks now.
            self.engine.abort(out.request_id)
            out.finish_reason = FinishReason.STOP.value
        return delta

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion as one continuously batched workload; outputs are
        returned in prompt order."""
        prompt_list = _as_prompt_list(prompts)
        if params is None or isinstance(params, SamplingParams):
            param_list = [params or SamplingParams()] * len(prompt_list)
        else:
            param_list = list(params)
        if len(param_list) != len(prompt_list):
            raise ValueError("one SamplingParams per prompt, or one for all")
        ids = [self.add_request(p, sp) for p, sp in zip(prompt_list, param_list, strict=True)]
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for output, _ in self.step():
                if output.finished:
                    done[output.request_id] = output
        return [done[i] for i in ids]

    def stream(self, prompt: Prompt, params: SamplingParams) -> Iterator[str]:
        """Text deltas of one request as they are generated."""
        request_id = self.add_request(prompt, params)
        finished = False
        while not finished:
            for output, delta in self.step():
                if output.request_id == request_id:
                    finished = output.finished
                    if delta:
                        yield delta
