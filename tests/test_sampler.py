"""Sampling: truncation never leaves its allowed set, seeds reproduce across batch shapes."""

from __future__ import annotations

import pytest
import torch

from engine.llm import LLM
from engine.sampler import apply_repetition_penalty, sample_row, truncate
from engine.sampling_params import SamplingParams

VOCAB = 50
DRAWS = 3000


def fixed_logits() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randn(VOCAB) * 2


def draw(logits: torch.Tensor, seed: int = 0) -> set[int]:
    generator = torch.Generator().manual_seed(seed)
    return {sample_row(logits, generator) for _ in range(DRAWS)}


def test_top_k_stays_in_the_k_best() -> None:
    logits = fixed_logits()
    allowed = set(torch.topk(logits, 5).indices.tolist())
    seen = draw(truncate(logits, top_k=5, top_p=1.0, min_p=0.0))
    assert seen <= allowed and len(seen) >= 4


def test_top_p_stays_in_the_nucleus() -> None:
    logits = fixed_logits()
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True).tolist()
    nucleus, total = set(), 0.0
    for token in order:  # smallest prefix of the ranking whose mass reaches 0.6
        nucleus.add(token)
        total += float(probs[token])
        if total >= 0.6:
            break
    seen = draw(truncate(logits, top_k=0, top_p=0.6, min_p=0.0))
    assert seen <= nucleus and len(seen) >= 2


def test_min_p_drops_unlikely_tokens() -> None:
    logits = fixed_logits()
    probs = logits.softmax(-1)
    allowed = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    seen = draw(truncate(logits, top_k=0, top_p=1.0, min_p=0.2))
    assert seen <= allowed and len(seen) >= 2


def test_combined_truncation_is_an_intersection() -> None:
    logits = fixed_logits()
    seen = draw(truncate(logits, top_k=3, top_p=0.9, min_p=0.05))
    assert seen <= set(torch.topk(logits, 3).indices.tolist())


def test_untruncated_sampling_follows_the_distribution() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0])
    generator = torch.Generator().manual_seed(1)
    counts = torch.bincount(
        torch.tensor([sample_row(logits, generator) for _ in range(6000)]), minlength=3
    )
    assert torch.allclose(counts / 6000, logits.softmax(-1), atol=0.03)


def test_repetition_penalty_follows_the_hf_rule() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0])
    apply_repetition_penalty(logits, [0, 1, 1], penalty=2.0)
    assert logits.tolist() == [1.0, -4.0, 1.0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_p": 0.0},
        {"top_k": -1},
        {"min_p": 1.5},
        {"temperature": -1},
        {"max_tokens": 0},
        {"repetition_penalty": 0},
        {"stop": ("",)},
        {"logprobs": 99},
    ],
)
def test_invalid_params_raise(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_seeded_sampling_is_reproducible_and_batch_independent(smol_llm: LLM) -> None:
    prompt = smol_llm.encode([{"role": "user", "content": "Invent a name for a cat."}])
    seeded = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=42)
    alone = smol_llm.generate([prompt], seeded)[0].token_ids
    others = [smol_llm.encode(f"Story {i}: once") for i in range(5)]
    mixed_params = [SamplingParams(max_tokens=12, temperature=0.8)] * 5 + [seeded]
    in_batch = smol_llm.generate([*others, prompt], mixed_params)[-1].token_ids
    assert in_batch == alone
    other_seed = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=43)
    draws = {tuple(smol_llm.generate([prompt], other_seed)[0].token_ids), tuple(alone)}
    assert len(draws) == 2, "a different seed should give a different sample"


def test_logprobs_report_chosen_and_top_tokens(smol_llm: LLM) -> None:
    out = smol_llm.generate(
        ["The sky is"], SamplingParams(max_tokens=5, temperature=0, logprobs=3)
    )[0]
    assert len(out.logprobs) == len(out.token_ids) == 5
    for token_id, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert entry.token_id == token_id and entry.logprob <= 0
        assert len(entry.top) == 3 and entry.top[0][0] == token_id  # greedy picks the top-1
        assert entry.top[0][1] == pytest.approx(entry.logprob)
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
