"""Per-request sampling parameters, validated at construction (the edge of the engine)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    #: Most tokens to generate.
    max_tokens: int = 16
    #: 0 means greedy (argmax).
    temperature: float = 1.0
    #: Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p.
    top_p: float = 1.0
    #: Keep the k most likely tokens; 0 disables.
    top_k: int = 0
    #: Drop tokens whose probability is below min_p times the most likely token's.
    min_p: float = 0.0
    #: > 1 discourages tokens already in the prompt or output (CTRL / Hugging Face rule).
    repetition_penalty: float = 1.0
    #: OpenAI rule: subtracted once from the logit of every token already in the output.
    presence_penalty: float = 0.0
    #: OpenAI rule: subtracted from a token's logit once per time it is in the output.
    frequency_penalty: float = 0.0
    #: Same seed, same tokens, whatever else is in the batch.
    seed: int | None = None
    #: Generation ends when the output text contains one of these (not included in the text).
    stop: tuple[str, ...] = ()
    #: Generation ends after one of these token ids (kept in token ids, not in the text).
    stop_token_ids: tuple[int, ...] = ()
    #: Keep generating past end-of-sequence tokens until max_tokens.
    ignore_eos: bool = False
    #: Return the chosen token's log-probability and this many top alternatives (None: none).
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.max_tokens < 1:
            problems.append(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not self.temperature >= 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 disables), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            problems.append(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                problems.append(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            problems.append(f"logprobs must be in [0, 20], got {self.logprobs}")
        if any(not s for s in self.stop):
            problems.append("stop strings must be non-empty")
        if any(t < 0 for t in self.stop_token_ids):
            problems.append("stop_token_ids must be non-negative")
        if problems:
            raise ValueError("; ".join(problems))
        # Lists from callers become tuples so the object stays hashable and immutable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        """Some penalty changes the logits before the token is chosen."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def is_argmax(self) -> bool:
        """The token is the argmax of the raw logits (nothing the host must look at)."""
        return self.is_greedy and not self.has_penalties and self.logprobs is None
