"""Engine flags shared by every command that builds an engine (generate, up, serve, bench).

Each flag falls back to a ``PDMESH_*`` variable, then to a default that depends on the device
where vLLM's does (a GPU batches 256 sequences, a CPU 64).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

from engine.config import (
    DTYPES,
    OFFLOAD_KINDS,
    SCHEDULING_POLICIES,
    CacheConfig,
    EngineConfig,
    MLFQConfig,
    OffloadConfig,
    SchedulerConfig,
    default_device,
)

#: Flag name -> (type, help). The variable is PDMESH_ + the name in upper case.
ENGINE_FLAGS: dict[str, tuple[Any, str]] = {
    "max_num_seqs": (int, "sequences batched at once (default 256 on GPU, 64 on CPU)"),
    "max_num_batched_tokens": (int, "tokens per forward pass (default max(2048, max_num_seqs))"),
    "gpu_memory_utilization": (float, "share of the GPU this worker may use (default 0.9)"),
    "num_kv_blocks": (int, "KV cache blocks (default: sized from the memory share)"),
    "load_format": (str, "auto (read the checkpoint) or dummy (random weights, shapes only)"),
    "quantization": (str, "int8 (weight-only) or fp8 (W8A8) linear weights, quantized at load"),
    "offload_weights": (str, "where layers beyond the GPU budget stay: " + "|".join(OFFLOAD_KINDS)),
    "gpu_weight_budget_gib": (float, "device GiB for weights under offload (default: all stream)"),
    "swap_space_gib": (float, "host GiB for preempted requests' KV (default 0: recompute)"),
    "mlfq_levels": (int, "mlfq: queues, level 0 served first (default 4)"),
    "mlfq_base_quantum": (int, "mlfq: tokens generated at level 0 before demotion (default 32)"),
    "mlfq_quantum_growth": (int, "mlfq: each level's quantum and prompt limit grow by (default 2)"),
    "mlfq_join_prompt_tokens": (int, "mlfq: longest prompt that joins level 0 (default 512)"),
    "mlfq_promotion_period": (int, "mlfq: idle steps before promotion to level 0 (default 500)"),
}
#: MLFQConfig field -> its flag in ENGINE_FLAGS.
MLFQ_FLAGS = {
    "num_levels": "mlfq_levels",
    "base_quantum": "mlfq_base_quantum",
    "quantum_growth": "mlfq_quantum_growth",
    "join_prompt_tokens": "mlfq_join_prompt_tokens",
    "promotion_period": "mlfq_promotion_period",
}
GPU_MAX_NUM_SEQS = 256
CPU_MAX_NUM_SEQS = 64
MIN_BATCHED_TOKENS = 2048
OFFLOAD_BATCH_SCALE = 2
OFFLOAD_MIN_BATCHED_TOKENS = 8192


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="HF model directory or .gguf file (default: SmolLM2-135M)")
    parser.add_argument(
        "--dtype", choices=["auto", *DTYPES], help="default auto: float32 on CPU, 16-bit on GPU"
    )
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--tp", type=int, help="tensor-parallel ranks (serve; default 1)")
    parser.add_argument(
        "--ep", type=int, help="ranks MoE experts are split over (divides --tp; default = TP)"
    )
    parser.add_argument(
        "--handoff-lane-mib",
        type=int,
        help="device memory of a prefill worker's hand-off lane (0: none; default 2048 on CUDA)",
    )
    for name, (kind, text) in ENGINE_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=kind, help=f"{text}; PDMESH_{name.upper()}")
    parser.add_argument(
        "--scheduling-policy",
        choices=SCHEDULING_POLICIES,
        help="order requests run in: fcfs (default), priority (the request's priority, lower "
        "first) or mlfq (FastServe's skip-join multi-level feedback queue); "
        "PDMESH_SCHEDULING_POLICY",
    )
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        default=None,
        help="no CUDA graphs (PDMESH_ENFORCE_EAGER=1)",
    )


def _setting(args: argparse.Namespace, name: str, environ: Mapping[str, str]) -> Any:
    given = getattr(args, name, None)
    if given is not None:
        return given
    raw = environ.get(f"PDMESH_{name.upper()}")
    if raw is None or raw == "":
        return None
    kind = ENGINE_FLAGS[name][0] if name in ENGINE_FLAGS else str
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"PDMESH_{name.upper()}={raw!r} is not a {kind.__name__}") from None


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _mlfq_config(args: argparse.Namespace, environ: Mapping[str, str]) -> MLFQConfig:
    given = {field: _setting(args, flag, environ) for field, flag in MLFQ_FLAGS.items()}
    return MLFQConfig(**{field: value for field, value in given.items() if value is not None})


def engine_config_from(
    args: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> EngineConfig:
    """The engine a command's flags (then variables, then defaults) describe."""
    device = args.device or environ.get("PDMESH_DEVICE") or default_device()
    offload = OffloadConfig(
        weights=_setting(args, "offload_weights", environ) or "none",
        gpu_weight_budget_gib=_setting(args, "gpu_weight_budget_gib", environ),
    )
    # Throughput mode: a streamed pass costs the link time whatever its size, so offload
    # defaults to twice the batch and to prefill budgets that take fewer, larger passes.
    scale = OFFLOAD_BATCH_SCALE if offload.enabled else 1
    seqs = _setting(args, "max_num_seqs", environ)
    seqs = seqs or scale * (GPU_MAX_NUM_SEQS if device.startswith("cuda") else CPU_MAX_NUM_SEQS)
    min_tokens = OFFLOAD_MIN_BATCHED_TOKENS if offload.enabled else MIN_BATCHED_TOKENS
    tokens = _setting(args, "max_num_batched_tokens", environ) or max(min_tokens, seqs)
    cache: dict[str, Any] = {
        "num_blocks": _setting(args, "num_kv_blocks", environ),
        "handoff_lane_mib": getattr(args, "handoff_lane_mib", None),
        "gpu_memory_utilization": _setting(args, "gpu_memory_utilization", environ),
        "swap_space_gib": _setting(args, "swap_space_gib", environ),
    }
    eager = getattr(args, "enforce_eager", None)
    if eager is None:
        eager = environ.get("PDMESH_ENFORCE_EAGER", "") not in ("", "0", "false")
    return EngineConfig.from_env(
        model=args.model,
        dtype=args.dtype,
        device=device,
        max_model_len=args.max_model_len,
        tensor_parallel_size=getattr(args, "tp", None),
        expert_parallel_size=_int_or_none(_setting(args, "ep", environ)),
        load_format=_setting(args, "load_format", environ),
        quantization=_setting(args, "quantization", environ),
        enforce_eager=eager,
        scheduler=SchedulerConfig(
            max_num_seqs=seqs,
            max_num_batched_tokens=tokens,
            policy=_setting(args, "scheduling_policy", environ) or "fcfs",
            mlfq=_mlfq_config(args, environ),
        ),
        cache=CacheConfig(**{k: v for k, v in cache.items() if v is not None}),
        offload=offload,
    )
