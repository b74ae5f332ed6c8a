"""Sparse (MoE) models on one GPU, dummy bf16 weights: a Mixtral-8x7B shape and a
Qwen3-30B-A3B shape, each against the floor of reading its weights, in one run.

    python -m bench.moe_gpu --out bench/results/moe-h200.json
    python -m bench.moe_gpu --dry-run            # CPU, tiny shapes: checks the harness

Per shape: decode ms/step at batch 1/16/64/256 (CUDA graphs), each beside the floor of
reading the weights that step needs (the dense part plus the experts a batch of that size
touches: the top-k at batch 1, all of them once batches are large) at the HBM read
bandwidth measured in the same run; prefill TFLOP/s (active-parameter FLOPs plus causal
attention); and one MoE layer alone, the fused Triton kernel against a per-expert torch loop
(what Hugging Face runs). Target at batch 1: at most 1.3x the active-weight floor.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.common import environment, write_json

TARGET_BATCH1_OF_FLOOR = 1.3

# name -> (transformers config class, kwargs)
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral-8x7b": (
        "MixtralConfig",
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=32768,
            rope_theta=1e6,
        ),
    ),
    "qwen3-30b-a3b": (
        "Qwen3MoeConfig",
        dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            max_position_embeddings=40960,
            rope_theta=1e6,
            tie_word_embeddings=False,
        ),
    ),
}
TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=2048,
)  # fmt: skip


def hf_config(name: str, dry_run: bool) -> Any:
    import transformers

    cls_name, kwargs = SHAPES[name]
    if dry_run:
        kwargs = {**kwargs, **TINY}
    return getattr(transformers, cls_name)(**kwargs, bos_token_id=None, eos_token_id=None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hbm_read_gbps(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    import triton.testing

    buffer = torch.empty(1 << 30, dtype=torch.bfloat16, device=device)  # 2 GiB
    ms = triton.testing.do_bench(lambda: buffer.sum(dtype=torch.float32), warmup=25, rep=200)
    return float(buffer.numel() * 2 / ms / 1e6)


def weight_bytes(model: torch.nn.Module, num_experts: int, top_k: int) -> dict[str, float]:
    """Bytes a step reads: the dense part (embeddings excluded: a step reads a few rows), one
    expert's share of every MoE layer (times the experts touched, by the caller)."""
    dense = expert = 0.0
    for name, param in model.named_parameters():
        size = param.numel() * param.element_size()
        if name.endswith(("w13_weight", "w2_weight")):
            expert += size / num_experts
        elif "embed_tokens" not in name:
            dense += size
    return {"dense": dense, "per_expert_all_layers": expert, "top_k": top_k}


def experts_touched(num_experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts per layer for a batch (uniform routing, as dummy weights)."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(batch)
    return torch.randint(0, vocab, (batch, length), generator=generator).tolist()


def decode_ms(engine: Any, batch: int, steps: int, vocab: int, device: torch.device) -> float:
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    for prompt in prompts(batch, 64, vocab):
        engine.add_request(prompt, params)
    for _ in range(4):  # prefill and a few decode steps
        engine.step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(device)
    elapsed = (time.perf_counter() - start) / steps * 1e3
    while engine.has_unfinished:
        engine.step()
    return elapsed


def prefill_tflops(
    engine: Any, hf: Any, active_params: float, tokens: int, seqs: int, device: torch.device
) -> dict[str, float]:
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    length = tokens // seqs
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    # 2 FLOPs per active weight per token, plus QK^T and PV over the causal triangle.
    attention = 4 * seqs * heads * head_dim * length * (length + 1) / 2 * hf.num_hidden_layers
    flops = 2 * active_params * tokens + attention
    best = float("inf")
    for _ in range(3):
        for prompt in prompts(seqs, length, hf.vocab_size):
            engine.add_request(prompt, params)
        sync(device)
        start = time.perf_counter()
        engine.step()  # the whole batch fits one step's token budget
        sync(device)
        best = min(best, time.perf_counter() - start)
        while engine.has_unfinished:
            engine.step()
    return {
        "prefill_tokens": tokens,
        "prefill_ms": best * 1e3,
        "prefill_tflops": flops / best / 1e12,
    }


def time_fn(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=50))
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def layer_kernels(
    hf: Any, dtype: torch.dtype, device: torch.device, batches: list[int]
) -> list[dict[str, Any]]:
    """One MoE layer: fused Triton kernel vs a per-expert torch loop (same inputs)."""
    from kernels.fused_moe import fused_moe, fused_moe_ref

    num_experts = getattr(hf, "num_local_experts", None) or hf.num_experts
    top_k = hf.num_experts_per_tok
    inter = getattr(hf, "moe_intermediate_size", None) or hf.intermediate_size
    size = hf.hidden_size
    w13 = torch.randn(num_experts, 2 * inter, size, dtype=dtype, device=device) * 0.02
    w2 = torch.randn(num_experts, size, inter, dtype=dtype, device=device) * 0.02
    per_expert = (w13.numel() + w2.numel()) * w13.element_size() / num_experts
    rows = []
    for tokens in batches:
        x = torch.randn(tokens, size, dtype=dtype, device=device)
        weights, ids = torch.topk(
            torch.randn(tokens, num_experts, device=device).softmax(-1), top_k
        )
        err = (
            (fused_moe(x, w13, w2, weights, ids) - fused_moe_ref(x, w13, w2, weights, ids))
            .abs()
            .max()
        )
        fused = time_fn(lambda: fused_moe(x, w13, w2, weights, ids), device)  # noqa: B023
        loop = time_fn(lambda: fused_moe_ref(x, w13, w2, weights, ids), device)  # noqa: B023
        touched = experts_touched(num_experts, top_k, tokens)
        rows.append({
            "tokens": tokens, "fused_ms": fused, "torch_loop_ms": loop,
            "speedup": loop / fused, "max_abs_err": float(err),
            "fused_gbps_touched_experts": touched * per_expert / fused / 1e6,
            "fused_tflops": 6.0 * tokens * top_k * size * inter / fused / 1e9,
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def measure(
    name: str, args: argparse.Namespace, device: torch.device, hbm: float
) -> dict[str, Any]:
    from engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from engine.engine import Engine

    hf = hf_config(name, args.dry_run)
    dtype = "float32" if args.dry_run else "bfloat16"
    row: dict[str, Any] = {"shape": name}
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        engine = Engine(
            EngineConfig(
                model=directory, dtype=dtype, device=device.type, load_format="dummy",
                max_model_len=2048,
                cache=CacheConfig(num_blocks=args.num_blocks, enable_prefix_caching=False),
                scheduler=SchedulerConfig(
                    max_num_seqs=max(args.batches), max_num_batched_tokens=args.prefill_tokens
                ),
            )
        )  # fmt: skip
        try:
            num_experts = getattr(hf, "num_local_experts", None) or hf.num_experts
            top_k = hf.num_experts_per_tok
            sizes = weight_bytes(engine.runner.model, num_experts, top_k)
            row["weights_gib"] = (
                sizes["dense"] + num_experts * sizes["per_expert_all_layers"]
            ) / 2**30
            for batch in args.batches:
                ms = decode_ms(engine, batch, args.steps, hf.vocab_size, device)
                touched = experts_touched(num_experts, top_k, batch)
                floor_bytes = sizes["dense"] + touched * sizes["per_expert_all_layers"]
                floor_ms = floor_bytes / hbm / 1e6 if hbm else float("nan")
                row[f"batch_{batch}"] = {
                    "ms_per_step": ms, "floor_ms": floor_ms, "of_floor": ms / floor_ms,
                    "experts_touched_per_layer": touched, "tokens_per_s": batch / ms * 1e3,
                }  # fmt: skip
                print(name, batch, row[f"batch_{batch}"], flush=True)
            if 1 in args.batches:
                row["batch_1_meets_target"] = row["batch_1"]["of_floor"] <= TARGET_BATCH1_OF_FLOOR
            active = (
                sizes["dense"] + top_k * sizes["per_expert_all_layers"]
            ) / engine.runner.dtype.itemsize
            row["active_params_b"] = active / 1e9
            row.update(
                prefill_tflops(engine, hf, active, args.prefill_tokens, args.prefill_seqs, device)
            )
        finally:
            engine.shutdown()
            del engine
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    row["layer"] = layer_kernels(hf, getattr(torch, dtype), device, args.layer_tokens)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prefill-tokens", type=int, default=8192)
    parser.add_argument("--prefill-seqs", type=int, default=8)
    parser.add_argument("--layer-tokens", type=int, nargs="+", default=[1, 16, 64, 256, 4096])
    parser.add_argument("--num-blocks", type=int, default=4096)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, interpreter")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.batches, args.steps, args.layer_tokens = [1, 4], 2, [1, 8]
        args.prefill_tokens, args.prefill_seqs, args.num_blocks = 64, 2, 256
        device = torch.device("cpu")
    else:
        device = torch.device("cuda")
    hbm = hbm_read_gbps(device)
    rows = [measure(name, args, device, hbm) for name in args.shapes]
    write_json(
        args.out, {**environment(), "hbm_read_gbps": hbm, "dry_run": args.dry_run, "shapes": rows}
    )


if __name__ == "__main__":
    main()
