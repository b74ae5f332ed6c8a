"""A prompt's greedy tokens do not depend on its company or on where its KV came from."""

from __future__ import annotations

from engine.llm import LLM
from engine.sampling_params import SamplingParams

TOPICS = [
    "the ocean",
    "mountains",
    "a robot",
    "coffee",
    "winter",
    "trains",
    "music",
    "a library",
    "gardening",
    "the moon",
    "bread",
    "chess",
    "rain",
    "bicycles",
    "volcanoes",
    "owls",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0)


def prompts(llm: LLM) -> list[list[int]]:
    return [
        llm.encode([{"role": "user", "content": f"Tell me one fact about {topic}."}])
        for topic in TOPICS
    ]


def test_alone_equals_batch_of_16(smol_llm_no_cache: LLM) -> None:
    llm = smol_llm_no_cache
    batch = llm.generate(prompts(llm), GREEDY)
    assert len(batch) == 16
    for index in (0, 7, 15):
        alone = llm.generate([prompts(llm)[index]], GREEDY)[0]
        assert alone.token_ids == batch[index].token_ids


def test_prefix_continuation_equals_cold_run(smol_llm: LLM, smol_llm_no_cache: LLM) -> None:
    system = "You are a meticulous assistant. " * 12  # several full 16-token blocks
    base = [{"role": "system", "content": system}, {"role": "user", "content": "Hi!"}]
    longer = [*base[:1], {"role": "user", "content": "Hi! What is a prime number?"}]
    first = smol_llm.generate([base], GREEDY)[0]
    assert first.num_cached_tokens == 0 or first.num_cached_tokens % 16 == 0
    continued = smol_llm.generate([longer], GREEDY)[0]
    assert continued.num_cached_tokens >= 64, "the shared system prompt came from the cache"
    cold = smol_llm_no_cache.generate([longer], GREEDY)[0]
    assert cold.num_cached_tokens == 0
    assert continued.token_ids == cold.token_ids


def test_repeat_of_whole_prompt_hits_cache_and_matches(smol_llm: LLM) -> None:
    prompt = smol_llm.encode("A list of the planets of the solar system, in order: " * 4)
    first = smol_llm.generate([prompt], GREEDY)[0]
    again = smol_llm.generate([prompt], GREEDY)[0]
    # every full block but the one holding the last token is reused
    assert again.num_cached_tokens == (len(prompt) - 1) // 16 * 16
    assert again.token_ids == first.token_ids
