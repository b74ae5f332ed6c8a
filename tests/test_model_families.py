"""Qwen3, Phi-3, Gemma 2, Mixtral, Qwen2-MoE and Qwen3-MoE: tiny random models saved by
transformers load from their directory and match Hugging Face greedy outputs token for token,
one prompt alone and all of them in one mixed batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.config import CacheConfig, EngineConfig, ModelConfig
from engine.llm import LLM
from engine.model_source import load_model_config, resolve_model
from engine.sampling_params import SamplingParams
from tests.conftest import hf_greedy
from tests.test_tiny_models import random_prompts
from tests.tiny_models import NEW_FAMILIES, load_hf, save_tiny_model

NEW_TOKENS = 12
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)


@pytest.mark.parametrize("kind", NEW_FAMILIES)
def test_family_matches_hugging_face(kind: str, tmp_path: Path) -> None:
    directory = save_tiny_model(kind, tmp_path)
    hf = load_hf(directory)
    llm = LLM(EngineConfig(model=str(directory), device="cpu", cache=CacheConfig(block_size=8)))
    # Mixed lengths; the last prompt runs past Gemma 2's 24-token window.
    prompts = [*random_prompts(3, seed=len(kind)), list(range(1, 61))]
    expected = [hf_greedy(hf, prompt, NEW_TOKENS) for prompt in prompts]
    alone = llm.generate([prompts[-1]], GREEDY)[0]
    assert alone.token_ids == expected[-1], "alone"
    batch = llm.generate(prompts, GREEDY)
    for i, out in enumerate(batch):
        assert out.token_ids == expected[i], f"prompt {i} in the batch"
    assert llm.engine.block_manager.allocator.num_used == 0


def test_family_configs_are_read(tmp_path: Path) -> None:
    def config(kind: str):  # type: ignore[no-untyped-def]
        return load_model_config(resolve_model(str(save_tiny_model(kind, tmp_path / kind))))

    gemma = config("gemma2")
    assert gemma.hidden_act == "gelu_tanh" and gemma.tie_word_embeddings
    assert (gemma.attn_logit_softcap, gemma.final_logit_softcap) == (2.0, 3.0)
    assert gemma.attention_scale == 32**-0.5
    assert [gemma.layer_sliding_window(i) for i in range(4)] == [24, None, 24, None]
    older = {**json.loads((tmp_path / "gemma2" / "config.json").read_text()), "layer_types": None}
    assert ModelConfig.from_hf(older).layer_types == gemma.layer_types  # pre-layer_types files
    assert config("qwen3").qk_norm
    qwen2_moe = config("qwen2_moe").moe
    assert qwen2_moe is not None and qwen2_moe.dense_layers == (1,)
    assert qwen2_moe.shared_expert_intermediate_size == 64 and not qwen2_moe.norm_topk_prob
    mixtral = config("mixtral").moe
    assert mixtral is not None and mixtral.norm_topk_prob and mixtral.num_experts == 4
    qwen3_moe = config("qwen3_moe").moe
    assert qwen3_moe is not None and qwen3_moe.norm_topk_prob and qwen3_moe.num_experts == 4


@pytest.mark.parametrize("kind", ["phi3", "gemma2"])
def test_dense_family_tp2_equals_tp1(kind: str, tmp_path: Path) -> None:
    # Phi-3's fused checkpoint tensors split before sharding; Gemma 2's caps and windows
    # hold per rank's heads.
    directory = str(save_tiny_model(kind, tmp_path))
    prompts = [*random_prompts(3, seed=7), list(range(1, 41))]
    cache = CacheConfig(block_size=8)
    expected = LLM(EngineConfig(model=directory, device="cpu", cache=cache)).generate(
        prompts, GREEDY
    )
    llm = LLM(EngineConfig(model=directory, device="cpu", cache=cache, tensor_parallel_size=2))
    try:
        got = llm.generate(prompts, GREEDY)
    finally:
        llm.engine.shutdown()
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]


def test_gemma2_logprobs_follow_the_capped_logits(tmp_path: Path) -> None:
    # tanh keeps the argmax, so greedy tokens cannot show the final soft-cap; logprobs do.
    import torch

    directory = save_tiny_model("gemma2", tmp_path)
    hf = load_hf(directory)
    llm = LLM(EngineConfig(model=str(directory), device="cpu", cache=CacheConfig(block_size=8)))
    prompt = random_prompts(1, seed=2)[0]
    out = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0, logprobs=0))[0]
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1]
    assert logits.abs().max() <= 3.0  # HF's own logits are capped at 3
    expected = logits.log_softmax(-1)
    for step, entry in enumerate(out.logprobs):
        assert entry.token_id == out.token_ids[step]
        assert abs(entry.logprob - float(expected[step, entry.token_id])) < 1e-4
