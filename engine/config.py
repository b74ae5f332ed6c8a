"""Frozen, validated configuration for models and the engine."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: Threads of a CPU engine core (``pdmesh up`` gives each worker its share of the cores).
CPU_THREADS_ENV = "PDMESH_CPU_THREADS"
SUPPORTED_ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma2",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
)
#: Families whose Hugging Face config applies ``sliding_window`` only with use_sliding_window.
_OPT_IN_WINDOW = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
#: HF activation names -> the gated activation of the MLP.
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
#: Linear-weight quantizations (``engine.quantization``).
QUANTIZATIONS = ("int8", "fp8")
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


def _layer_types(hf: dict[str, Any]) -> tuple[str, ...]:
    """Per-layer attention kinds; Gemma 2 configs written before ``layer_types`` existed
    alternate, sliding first."""
    if hf.get("layer_types"):
        return tuple(hf["layer_types"])
    if hf.get("model_type") == "gemma2":
        kinds = ("sliding_attention", "full_attention")
        return tuple(kinds[i % 2] for i in range(hf["num_hidden_layers"]))
    return ()


@dataclass(frozen=True)
class MoEConfig:
    """Sparse MLP of Mixtral, Qwen2-MoE and Qwen3-MoE: each token runs its top-k experts."""

    num_experts: int
    num_experts_per_tok: int
    #: Intermediate size of one expert.
    moe_intermediate_size: int
    #: Renormalize the top-k routing weights to sum to 1 (Mixtral always; Qwen by config).
    norm_topk_prob: bool
    #: Qwen2-MoE's always-on shared expert (gated by a sigmoid); 0: none.
    shared_expert_intermediate_size: int = 0
    #: Layers that keep a dense MLP (Qwen ``mlp_only_layers`` / ``decoder_sparse_step``).
    dense_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError("num_experts_per_tok must be in [1, num_experts]")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> MoEConfig | None:
        num_experts = hf.get("num_local_experts") or hf.get("num_experts")
        if not num_experts:
            return None
        step = hf.get("decoder_sparse_step", 1) or 1
        only_dense = set(hf.get("mlp_only_layers") or ())
        dense = tuple(
            i for i in range(hf["num_hidden_layers"]) if i in only_dense or (i + 1) % step != 0
        )
        is_mixtral = hf.get("model_type") == "mixtral"
        return cls(
            num_experts=num_experts,
            num_experts_per_tok=hf["num_experts_per_tok"],
            moe_intermediate_size=hf["intermediate_size"]
            if is_mixtral
            else hf["moe_intermediate_size"],
            norm_topk_prob=True if is_mixtral else bool(hf.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size") or 0,
            dense_layers=dense,
        )


@dataclass(frozen=True)
class ModelConfig:
    """Shape and vocabulary of a decoder: Llama 2/3, Mistral, Qwen2/3, SmolLM2, Phi-3, Gemma 2
    and the sparse Mixtral, Qwen2-MoE and Qwen3-MoE (``moe``)."""

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
    #: Qwen3: per-head RMSNorm of queries and keys before the rotary embedding.
    qk_norm: bool = False
    #: Gated MLP activation: "silu" (SwiGLU) or "gelu_tanh" (Gemma's GeGLU).
    hidden_act: str = "silu"
    #: Attention score scale; None: head_dim ** -0.5 (Gemma 2: query_pre_attn_scalar ** -0.5).
    attention_scale: float | None = None
    #: Gemma 2: scores become cap * tanh(score / cap) before the softmax; None: no cap.
    attn_logit_softcap: float | None = None
    #: Gemma 2: logits become cap * tanh(logit / cap).
    final_logit_softcap: float | None = None
    #: Per-layer "sliding_attention" / "full_attention" (Gemma 2 alternates); empty: every
    #: layer uses ``sliding_window``.
    layer_types: tuple[str, ...] = ()
    moe: MoEConfig | None = None
    #: The checkpoint's linear weights are already quantized this way (fp8 with scales), or None.
    quantization: str | None = None

    def layer_sliding_window(self, layer: int) -> int | None:
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

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
        if self.hidden_act not in ("silu", "gelu_tanh"):
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}")
        if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError("layer_types must name every layer")

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
        sliding_window = hf.get("sliding_window") or None
        if model_type in _OPT_IN_WINDOW and not hf.get("use_sliding_window", False):
            sliding_window = None
        if float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
            raise ValueError("partial rotary embeddings are not supported")
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
        if act not in _ACTIVATIONS:
            raise ValueError(f"unsupported activation {act!r}")
        pre_attn = hf.get("query_pre_attn_scalar") if model_type == "gemma2" else None
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
            attention_bias=model_type == "qwen2"
            or bool(hf.get("qkv_bias", hf.get("attention_bias", False))),
            rope_scaling=scaling,
            sliding_window=sliding_window,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(config_eos + eos_token_ids)),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            hidden_act=_ACTIVATIONS[act],
            attention_scale=float(pre_attn) ** -0.5 if pre_attn else None,
            attn_logit_softcap=hf.get("attn_logit_softcapping") if model_type == "gemma2" else None,
            final_logit_softcap=hf.get("final_logit_softcapping")
            if model_type == "gemma2"
            else None,
            layer_types=_layer_types(hf) if sliding_window else (),
            moe=MoEConfig.from_hf(hf),
            quantization=checkpoint_quantization(hf.get("quantization_config")),
        )


def checkpoint_quantization(spec: dict[str, Any] | None) -> str | None:
    """ "fp8" for an fp8 checkpoint with per-tensor or per-channel weight scales (the ``fp8``
    kind, or compressed-tensors' float 8-bit weights); None for none. Anything else (block
    scales, integer or 4-bit schemes) is refused rather than read as float weights."""
    if not spec:
        return None
    method = spec.get("quant_method")
    if method == "fp8" and not spec.get("weight_block_size"):
        return "fp8"
    if method == "compressed-tensors":
        groups = list((spec.get("config_groups") or {}).values())
        weights = [g.get("weights") or {} for g in groups]
        if weights and all(
            w.get("type") == "float"
            and w.get("num_bits") == 8
            and w.get("strategy") in ("tensor", "channel")
            for w in weights
        ):
            return "fp8"
    raise ValueError(f"unsupported checkpoint quantization_config: {spec}")


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
    #: Host memory, GiB, for the KV blocks of preempted requests (``engine.swap``): a victim
    #: is copied out and back when that is cheaper than recomputing it; 0: always recompute.
    #: Tensor-parallel workers recompute.
    swap_space_gib: float = 0.0

    def resolved_async_retain(self, device_type: str) -> bool:
        return self.async_retain if self.async_retain is not None else device_type == "cuda"

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.handoff_lane_mib is not None and self.handoff_lane_mib < 0:
            raise ValueError(f"handoff_lane_mib must be >= 0, got {self.handoff_lane_mib}")
        if self.swap_space_gib < 0:
            raise ValueError(f"swap_space_gib must be >= 0, got {self.swap_space_gib}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )


#: Scheduling policies (``engine.scheduling_policy``): first come first served, request
#: priorities (lower runs first), FastServe's skip-join multi-level feedback queue.
SCHEDULING_POLICIES = ("fcfs", "priority", "mlfq")


@dataclass(frozen=True)
class MLFQConfig:
    """FastServe's skip-join MLFQ, counted in iterations and tokens rather than seconds."""

    #: Queues, level 0 served first; the last level's quantum never runs out.
    num_levels: int = 4
    #: Generated tokens a request may produce at level 0 before it is demoted to level 1.
    base_quantum: int = 32
    #: Each level's quantum is this many times the one above it (FastServe doubles).
    quantum_growth: int = 2
    #: Skip-join: prompts up to this many tokens join level 0, each level below takes
    #: prompts ``quantum_growth`` times longer (the prompt's length predicts the cost of
    #: its first iteration), the longest join the last level.
    join_prompt_tokens: int = 512
    #: A request that has not been scheduled for this many iterations is promoted to
    #: level 0 (no starvation).
    promotion_period: int = 500

    def __post_init__(self) -> None:
        for name in ("num_levels", "base_quantum", "join_prompt_tokens", "promotion_period"):
            if getattr(self, name) < 1:
                raise ValueError(f"mlfq {name} must be at least 1, got {getattr(self, name)}")
        if self.quantum_growth < 1:
            raise ValueError(f"mlfq quantum_growth must be at least 1, got {self.quantum_growth}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous-batching limits per iteration, and the order requests are served in."""

    #: Most sequences running at once.
    max_num_seqs: int = 64
    #: Token budget of one forward pass (decode tokens + prefill chunk tokens).
    max_num_batched_tokens: int = 2048
    #: "fcfs" (arrival order, preempt the newest), "priority" (each request's ``priority``,
    #: lower first; preempt the lowest) or "mlfq" (skip-join multi-level feedback queue).
    policy: str = "fcfs"
    mlfq: MLFQConfig = field(default_factory=MLFQConfig)

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0:
            raise ValueError("max_num_seqs must be positive")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs")
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(
                f"scheduling policy must be one of {', '.join(SCHEDULING_POLICIES)}, "
                f"got {self.policy!r}"
            )


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
    #: Linear weights quantized at load: "int8" (weight-only, W8A16) or "fp8" (e4m3, W8A8 with
    #: per-token activation scales); None keeps them in ``dtype`` (or as the checkpoint has them).
    quantization: str | None = None
    #: Run decode steps eagerly instead of replaying CUDA graphs (CUDA only).
    enforce_eager: bool = False
    #: Ranks (processes, one GPU each on CUDA) the model is sharded over.
    tensor_parallel_size: int = 1
    #: Ranks an MoE layer's experts are split over (each expert whole on its rank when it
    #: equals the TP size; sharded over the remaining tensor_parallel_size / EP ranks
    #: otherwise); dense layers stay tensor-parallel. None: EP = TP.
    expert_parallel_size: int | None = None
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
        ep = self.expert_parallel_size
        if ep is not None and (ep < 1 or self.tensor_parallel_size % ep):
            raise ValueError(
                f"expert_parallel_size {ep} must divide tensor_parallel_size "
                f"{self.tensor_parallel_size}"
            )
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError("max_model_len must be positive")
        if self.quantization not in (None, *QUANTIZATIONS):
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}"
            )

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
