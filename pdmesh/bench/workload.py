"""Benchmark workloads: seeded synthetic requests with realistic length distributions, or
prompts from a local JSONL file. No network: synthetic prompts are token ids drawn from the
model's vocabulary, so a prompt's length is exact.

Length distributions (log-normal, clipped; medians in tokens):

| name | input median (range) | output median (range) | like |
| --- | --- | --- | --- |
| ``sharegpt`` | 128 (4-1024) | 128 (4-1024) | chat conversations |
| ``summarization`` | 1024 (256-4096) | 64 (8-256) | long in, short out |
| ``code`` | 256 (16-2048) | 192 (16-1024) | completion of code |

``length_scale`` multiplies every median and bound (e.g. 0.25 for small CPU runs), and fixed
``input_len`` / ``output_len`` replace a side's distribution (for sweeps).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

#: Token ids below this are left out of synthetic prompts (special and control tokens).
FIRST_PLAIN_TOKEN = 256


@dataclass(frozen=True)
class LengthDistribution:
    """A log-normal length: ``median * exp(sigma * N(0, 1))``, rounded, clipped."""

    median: float
    sigma: float
    low: int
    high: int

    def __post_init__(self) -> None:
        if not (self.median > 0 and self.sigma >= 0 and 1 <= self.low <= self.high):
            raise ValueError(f"bad length distribution {self}")

    def scaled(self, factor: float) -> LengthDistribution:
        return LengthDistribution(
            self.median * factor,
            self.sigma,
            max(1, round(self.low * factor)),
            max(1, round(self.high * factor)),
        )

    def sample(self, rng: random.Random) -> int:
        value = round(self.median * math.exp(self.sigma * rng.gauss(0.0, 1.0)))
        return min(max(value, self.low), self.high)


DISTRIBUTIONS: dict[str, tuple[LengthDistribution, LengthDistribution]] = {
    "sharegpt": (LengthDistribution(128, 1.0, 4, 1024), LengthDistribution(128, 0.9, 4, 1024)),
    "summarization": (
        LengthDistribution(1024, 0.4, 256, 4096),
        LengthDistribution(64, 0.4, 8, 256),
    ),
    "code": (LengthDistribution(256, 0.8, 16, 2048), LengthDistribution(192, 0.7, 16, 1024)),
}


@dataclass(frozen=True)
class BenchRequest:
    """One request to send: token ids or text, and how many tokens to generate."""

    max_tokens: int
    prompt_token_ids: tuple[int, ...] = ()
    prompt: str = ""

    def __post_init__(self) -> None:
        if bool(self.prompt_token_ids) == bool(self.prompt):
            raise ValueError("a benchmark request has exactly one of prompt_token_ids or prompt")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")

    @property
    def prompt_len(self) -> int:
        """Exact for token ids; for text, known only after tokenization (0 here)."""
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class WorkloadSpec:
    #: A name in DISTRIBUTIONS, or "jsonl" (prompts from ``path``).
    name: str = "sharegpt"
    num_requests: int = 32
    seed: int = 0
    length_scale: float = 1.0
    #: Fixed prompt / output lengths, overriding the distribution's side.
    input_len: int | None = None
    output_len: int | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        if self.name not in (*DISTRIBUTIONS, "jsonl"):
            names = ", ".join((*DISTRIBUTIONS, "jsonl"))
            raise ValueError(f"unknown workload {self.name!r}; one of {names}")
        if self.name == "jsonl" and not self.path:
            raise ValueError("the jsonl workload needs a path")
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be at least 1, got {self.num_requests}")
        if not self.length_scale > 0:
            raise ValueError(f"length_scale must be positive, got {self.length_scale}")
        for name in ("input_len", "output_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")


def synthetic_prompt(rng: random.Random, length: int, vocab_size: int) -> tuple[int, ...]:
    low = min(FIRST_PLAIN_TOKEN, vocab_size // 2)
    return tuple(rng.randrange(low, vocab_size) for _ in range(length))


def synthetic(spec: WorkloadSpec, vocab_size: int, max_model_len: int) -> list[BenchRequest]:
    """The same requests for the same spec and vocabulary, whatever else runs."""
    inputs, outputs = (d.scaled(spec.length_scale) for d in DISTRIBUTIONS[spec.name])
    rng = random.Random(spec.seed)
    requests = []
    for _ in range(spec.num_requests):
        input_len = spec.input_len or inputs.sample(rng)
        output_len = spec.output_len or outputs.sample(rng)
        input_len = min(input_len, max(1, max_model_len - output_len))
        prompt = synthetic_prompt(rng, input_len, vocab_size)
        requests.append(BenchRequest(output_len, prompt_token_ids=prompt))
    return requests


def from_jsonl(spec: WorkloadSpec) -> list[BenchRequest]:
    """Lines of ``{"prompt": text}`` or ``{"prompt_token_ids": [...]}``, with an optional
    ``"max_tokens"``; taken in order, cycled up to ``num_requests``. Outputs without a length
    use ``output_len`` or the sharegpt output distribution (seeded)."""
    assert spec.path is not None
    rng = random.Random(spec.seed)
    outputs = DISTRIBUTIONS["sharegpt"][1].scaled(spec.length_scale)
    rows = []
    for number, line in enumerate(Path(spec.path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{spec.path}:{number}: not JSON: {error}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{spec.path}:{number}: expected an object")
        rows.append((number, row))
    if not rows:
        raise ValueError(f"{spec.path}: no prompts")
    requests = []
    for index in range(spec.num_requests):
        number, row = rows[index % len(rows)]
        max_tokens = row.get("max_tokens") or spec.output_len or outputs.sample(rng)
        try:
            requests.append(
                BenchRequest(
                    int(max_tokens),
                    prompt_token_ids=tuple(int(t) for t in row.get("prompt_token_ids", ())),
                    prompt=str(row.get("prompt", "")),
                )
            )
        except ValueError as error:
            raise ValueError(f"{spec.path}:{number}: {error}") from None
    return requests


def make_workload(spec: WorkloadSpec, vocab_size: int, max_model_len: int) -> list[BenchRequest]:
    if spec.name == "jsonl":
        return from_jsonl(spec)
    return synthetic(spec, vocab_size, max_model_len)
