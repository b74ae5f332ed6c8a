"""Llama 3 (rope scaling), Mistral (incl. sliding window), Qwen2 (QKV bias, tied embeddings):
random models saved by transformers load from their directory and match HF greedy outputs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine.config import CacheConfig, EngineConfig
from engine.llm import LLM
from engine.model_source import load_model_config, resolve_model
from engine.sampling_params import SamplingParams
from tests.conftest import hf_greedy
from tests.tiny_models import load_hf, save_tiny_model

NEW_TOKENS = 24


def random_prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(rng.randint(3, 90))] for _ in range(count)]


@pytest.mark.parametrize(
    ("kind", "shard"),
    [("llama3", None), ("mistral", "100KB"), ("mistral_window", None), ("qwen2", None)],
)
def test_tiny_model_matches_hugging_face(
    kind: str, shard: str | None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    directory = save_tiny_model(kind, tmp_path_factory.mktemp(kind), max_shard_size=shard)
    if shard:
        assert len(list(directory.glob("*.safetensors"))) > 1, "expected a sharded checkpoint"
    hf = load_hf(directory)
    llm = LLM(EngineConfig(model=str(directory), device="cpu", cache=CacheConfig(block_size=8)))
    prompts = random_prompts(6, seed=len(kind))
    if kind == "mistral_window":  # attention must respect the window past its length
        prompts.append(list(range(40)))
    outputs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, NEW_TOKENS)


def test_configs_are_read_from_the_directory(tmp_path: Path) -> None:
    config = load_model_config(resolve_model(str(save_tiny_model("llama3", tmp_path))))
    assert config.rope_scaling is not None and config.rope_scaling.factor == 8.0
    assert not config.tie_word_embeddings and config.num_key_value_heads == 2
    qwen = load_model_config(resolve_model(str(save_tiny_model("qwen2", tmp_path / "q"))))
    assert qwen.attention_bias and qwen.tie_word_embeddings
