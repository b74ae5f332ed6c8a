"""Checkpoint readers: each yields (hf_name, tensor) pairs that ``Model.load_weights`` places."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.model_source import ModelSource


def iter_safetensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of every ``*.safetensors`` file (one file or a sharded set)."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {directory}")
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, handle.get_tensor(name)


def iter_weights(source: ModelSource, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    if source.is_gguf:
        from engine.gguf_weights import iter_gguf_weights

        return iter_gguf_weights(source.path, config)
    return iter_safetensors(source.path)
