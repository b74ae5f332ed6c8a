"""Frozen, validated configuration for models and the engine."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling; ``rope_type`` 'llama3' is the only kind supported."""

    rope_type: str
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        if self.rope_type != "llama3":
            raise ValueError(f"unsupported rope scaling type {self.rope_type!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and vocabulary of a Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    #: Qwen2 has biases on the Q, K and V projections.
    attention_bias: bool = False
    rope_scaling: RopeScaling | None = None
    #: Mistral-style local attention window in tokens, or None for full attention.
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for rotary embeddings")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], eos_token_ids: tuple[int, ...] = ()) -> ModelConfig:
        """Builds from a Hugging Face ``config.json`` dict (transformers 4.x or 5.x keys)."""
        model_type = hf.get("model_type", "llama")
        heads = hf["num_attention_heads"]
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type not in (None, "default"):
            scaling = RopeScaling(
                rope_type=rope_type,
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        sliding_window = hf.get("sliding_window")
        if model_type == "qwen2" and not hf.get("use_sliding_window", False):
            sliding_window = None
        eos = hf.get("eos_token_id")
        config_eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=model_type == "qwen2" or hf.get("attention_bias", False),
            rope_scaling=scaling,
            sliding_window=sliding_window,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(config_eos + eos_token_ids)),
        )


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache geometry."""

    #: Tokens per KV block.
    block_size: int = 16
    #: Number of KV blocks per worker; None sizes the cache from ``max_model_len`` and
    #: ``SchedulerConfig.max_num_seqs`` (capped so CPU runs stay small).
    num_blocks: int | None = None
    #: Reuse full blocks whose token prefix is already cached (hash chain over token ids).
    enable_prefix_caching: bool = True
    #: Device memory a prefill worker keeps for the hand-off lane (``kvstore.device_lane``:
    #: decode workers of the host copy fresh blocks device to device); 0: it publishes
    #: through the store. None picks 2 GiB (at most 1/32 of the device) on CUDA and no lane
    #: at all on the CPU. Decode workers read the lane whatever their own value.
    handoff_lane_mib: int | None = None
    #: Write finished requests' blocks to the store on a background thread (the decode loop
    #: does not wait for host memory); None: on CUDA only (``engine.host_publisher``).
    async_retain: bool | None = None
    #: Share of the device's memory this worker may hold in all (weights, KV cache,
    #: activations); workers sharing a GPU each get their own share (``pdmesh up`` divides).
    gpu_memory_utilization: float = 0.9

    def resolved_async_retain(self, device_type: str) -> bool:
        return self.async_retain if self.async_retain is not None else device_type == "cuda"

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.handoff_lane_mib is not None and self.handoff_lane_mib < 0:
            raise ValueError(f"handoff_lane_mib must be >= 0, got {self.handoff_lane_mib}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous-batching limits per iteration."""

    #: Most sequences running at once.
    max_num_seqs: int = 64
    #: Token budget of one forward pass (decode tokens + prefill chunk tokens).
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0:
            raise ValueError("max_num_seqs must be positive")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs")


OFFLOAD_KINDS = ("none", "cpu", "disk")


@dataclass(frozen=True)
class OffloadConfig:
    """ZeRO-Inference style weight streaming: decoder layers beyond a device budget live in
    host memory (pinned on CUDA) or in one file per layer, and a ring of device buffers is
    filled ahead of the forward pass (``engine.weight_stream``)."""

    #: Where the layers that do not fit stay: "none" (every weight on the device), "cpu"
    #: (host memory) or "disk" (per-layer files read with large, direct where possible, reads).
    weights: str = "none"
    #: Device memory for weights, GiB: embeddings, head, norms, resident layers and the
    #: ring's buffers. None streams every decoder layer.
    gpu_weight_budget_gib: float | None = None
    #: Layers the ring holds (loads in flight ahead of compute); None measures one layer's
    #: transfer and compute time: 2, or 3 when the two are close (``measured_depth``).
    prefetch_depth: int | None = None
    #: Directory for the per-layer files of "disk"; None: a temporary directory.
    disk_dir: str | None = None

    def __post_init__(self) -> None:
        if self.weights not in OFFLOAD_KINDS:
            raise ValueError(
                f"offload weights must be one of {OFFLOAD_KINDS}, got {self.weights!r}"
            )
        budget = self.gpu_weight_budget_gib
        if budget is not None and budget < 0:
            raise ValueError(f"gpu_weight_budget_gib must be >= 0, got {budget}")
        if self.prefetch_depth is not None and self.prefetch_depth < 2:
            raise ValueError(f"prefetch_depth must be at least 2, got {self.prefetch_depth}")

    @property
    def enabled(self) -> bool:
        return self.weights != "none"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def auto_dtype(model: str | None, device: str) -> str:
    """``--dtype auto``: float32 on the CPU (exact, and what CPUs compute fastest); on a GPU
    the checkpoint's half-precision dtype, bfloat16 where it has none (as vLLM does)."""
    if not device.startswith("cuda"):
        return "float32"
    config = Path(model) / "config.json" if model else None
    if config is not None and config.is_file():
        hf = json.loads(config.read_text())
        declared = hf.get("torch_dtype") or hf.get("dtype")  # transformers 4 / 5 spelling
        if declared in ("bfloat16", "float16"):
            return str(declared)
    return "bfloat16"


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine needs; built from CLI flags and ``PDMESH_*`` variables."""

    #: HF model directory or .gguf file; None means the default model (SmolLM2-135M-Instruct).
    model: str | None = None
    #: Weights and activations dtype: float32, bfloat16, float16, or "auto": float32 on the
    #: CPU; on a GPU the checkpoint's 16-bit dtype (bfloat16 for float32 checkpoints).
    dtype: str = "auto"
    device: str = field(default_factory=default_device)
    #: Longest sequence (prompt + generated); None means the model's own limit.
    max_model_len: int | None = None
    seed: int = 0
    #: "auto" reads the checkpoint; "dummy" leaves random weights (benchmarks, shapes only).
    load_format: str = "auto"
    #: Run decode steps eagerly instead of replaying CUDA graphs (CUDA only).
    enforce_eager: bool = False
    #: Ranks (processes, one GPU each on CUDA) the model is sharded over.
    tensor_parallel_size: int = 1
    #: Schedule step N+1 while the device computes step N (greedy rows' tokens stay on the
    #: device until then). None: on for CUDA, off on CPU where the forward pass is synchronous
    #: and overlapping would only delay each token by one step.
    async_scheduling: bool | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)

    def __post_init__(self) -> None:
        if self.dtype == "auto":
            object.__setattr__(self, "dtype", auto_dtype(self.model, self.device))
        if self.dtype not in DTYPES:
            raise ValueError(
                f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}"
            )
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be at least 1")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError("max_model_len must be positive")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def overlaps_steps(self) -> bool:
        """Async scheduling applies. Under tensor parallelism the leader patches the pending
        inputs on its device before it broadcasts them, so followers never see a placeholder."""
        if self.async_scheduling is None:
            return self.device.startswith("cuda")
        return self.async_scheduling

    @classmethod
    def from_env(cls, **overrides: Any) -> EngineConfig:
        """Defaults, then ``PDMESH_MODEL`` / ``PDMESH_DTYPE`` / ``PDMESH_DEVICE``, then overrides
        (None values in overrides are ignored)."""
        values: dict[str, Any] = {}
        for key in ("model", "dtype", "device"):
            env = os.environ.get(f"PDMESH_{key.upper()}")
            if env:
                values[key] = env
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
