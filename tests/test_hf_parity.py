"""Greedy outputs of the default model match Hugging Face transformers token for token."""

from __future__ import annotations

import pytest
import torch

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.conftest import hf_greedy

LONG_TEXT = " ".join(
    f"Paragraph {i}: the committee reviewed the quarterly figures, noted that shipping costs "
    f"rose in region {i % 7}, and asked the analysts to explain the variance."
    for i in range(12)
)

PROMPTS: list[str | list[dict[str, str]]] = [
    "The capital of France is",
    [{"role": "user", "content": "What is 2+2? Answer briefly."}],
    "def fibonacci(n):\n    ",
    [{"role": "user", "content": "Écris une phrase sur le café à Paris. 你好，世界！ 🎉"}],
    "Once upon a time, in a land far away,",
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three primary colors."},
    ],
    "Summarize the following notes.\n" + LONG_TEXT + "\nSummary:",
    "1, 2, 3, 4, 5,",
    [{"role": "user", "content": "Translate 'good morning' to German and Japanese (日本語)."}],
]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def prompt_ids(smol_llm: LLM) -> list[list[int]]:
    return [smol_llm.encode(p) for p in PROMPTS]


def test_prompts_are_varied(prompt_ids: list[list[int]]) -> None:
    lengths = [len(p) for p in prompt_ids]
    assert max(lengths) > 300, lengths
    assert len(set(lengths)) == len(lengths), "mixed lengths in one batch"


def test_one_batch_matches_hugging_face(
    smol_llm: LLM, hf_smol: torch.nn.Module, prompt_ids: list[list[int]]
) -> None:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    outputs = smol_llm.generate(prompt_ids, params)
    for prompt, ids, out in zip(PROMPTS, prompt_ids, outputs, strict=True):
        expected = hf_greedy(hf_smol, ids, NEW_TOKENS)
        assert out.token_ids == expected, f"prompt {prompt!r}"
        assert out.finish_reason in ("stop", "length")
    # Finished requests hold no blocks (prefix-cached blocks sit in the free queue).
    assert smol_llm.engine.block_manager.allocator.num_used == 0
