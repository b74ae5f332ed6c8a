"""Presence and frequency penalties (OpenAI's rule) against a reference: a direct
transcription of the documented formula, and Hugging Face ``generate`` with a logits
processor applying it, greedy, token for token."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine.config import CacheConfig, EngineConfig
from engine.llm import LLM
from engine.sampler import apply_output_penalties
from engine.sampling_params import SamplingParams
from tests.tiny_models import load_hf, save_tiny_model

NEW_TOKENS = 24


def reference_penalties(
    logits: list[float], output_ids: list[int], presence: float, frequency: float
) -> list[float]:
    """mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence."""
    counts = {token: output_ids.count(token) for token in set(output_ids)}
    return [
        value - counts.get(j, 0) * frequency - float(counts.get(j, 0) > 0) * presence
        for j, value in enumerate(logits)
    ]


@pytest.mark.parametrize(("presence", "frequency"), [(0.5, 0.0), (0.0, 0.7), (-0.4, 1.3)])
def test_penalties_follow_the_openai_formula(presence: float, frequency: float) -> None:
    rng = random.Random(7)
    logits = [rng.uniform(-5, 5) for _ in range(40)]
    output_ids = [rng.randrange(12) for _ in range(30)]
    got = apply_output_penalties(torch.tensor(logits), output_ids, presence, frequency)
    want = reference_penalties(logits, output_ids, presence, frequency)
    assert got.tolist() == pytest.approx(want, abs=1e-5)


def test_a_token_still_on_the_device_counts_for_nothing() -> None:
    logits = torch.zeros(4)
    apply_output_penalties(logits, [1, 1, -1], presence=1.0, frequency=1.0)
    assert logits.tolist() == [0.0, -3.0, 0.0, 0.0]


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
def test_penalties_outside_minus_two_to_two_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: 2.5})  # type: ignore[arg-type]


class OpenAIPenalties:
    """A Hugging Face logits processor applying the formula to the generated tokens only."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        output = input_ids[0, self.prompt_len :].tolist()
        row = reference_penalties(scores[0].tolist(), output, self.presence, self.frequency)
        return torch.tensor([row], dtype=scores.dtype)


def hf_penalized(model, prompt: list[int], presence: float, frequency: float) -> list[int]:
    from transformers import LogitsProcessorList

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            logits_processor=LogitsProcessorList(
                [OpenAIPenalties(len(prompt), presence, frequency)]
            ),
        )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LLM]:
    directory = save_tiny_model("llama3", tmp_path_factory.mktemp("penalties"))
    config = EngineConfig(model=str(directory), device="cpu", cache=CacheConfig(block_size=8))
    return directory, LLM(config)


@pytest.mark.parametrize(("presence", "frequency"), [(0.8, 0.0), (0.0, 0.6), (0.5, 1.0)])
def test_greedy_with_penalties_matches_hugging_face(
    tiny: tuple[Path, LLM], presence: float, frequency: float
) -> None:
    directory, llm = tiny
    hf = load_hf(directory)
    rng = random.Random(11)
    prompts = [[rng.randrange(512) for _ in range(rng.randint(4, 30))] for _ in range(4)]
    penalized = SamplingParams(
        max_tokens=NEW_TOKENS, temperature=0, presence_penalty=presence, frequency_penalty=frequency
    )
    outputs = llm.generate(prompts, penalized)
    plain = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.token_ids == hf_penalized(hf, prompt, presence, frequency)
    assert any(p.token_ids != o.token_ids for p, o in zip(plain, outputs, strict=True)), (
        "the penalties should change some greedy output"
    )
