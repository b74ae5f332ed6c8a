"""bf16 vs int8 (W8A16) vs fp8 (W8A8) on one GPU: Llama-3.1-8B and 70B shapes, dummy weights.

    python -m bench.quant_gpu --out bench/results/quant-h200.json
    python -m bench.quant_gpu --device cpu --shapes tiny --batches 1 2 --new-tokens 4  # harness

For each shape and weight format: weight memory on the device, decode ms per step at each
batch size (steps timed alone, greedy, fixed lengths) and tokens/s, 4k-token prefill TFLOP/s,
or why it did not fit (the 70B shape in bf16 does not fit one H200; the question is whether
fp8 does). Each row also reports its step time against the same shape's bf16 row, and the
weight-read floor at the HBM bandwidth measured in the same run. The issue's targets: int8
and fp8 batch-1 steps <= 0.6x bf16; fp8 batch-256 tokens/s >= 1.3x bf16; 70B serves in fp8.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench import engine_gpu
from bench.common import environment, write_json
from bench.engine_gpu import hf_config, prefill_tflops, prompts, run_pdmesh
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine import Engine

METHODS: tuple[str | None, ...] = (None, "int8", "fp8")
#: (hidden, intermediate, heads, layers); "tiny" only checks the script on a CPU.
TINY = (256, 512, 4, 2)
PREFILL_TOKENS = 4096


def model_config(shape: str, layers: int | None) -> Any:
    if shape != "tiny":
        return hf_config(layers, shape)
    cfg = hf_config(layers or TINY[3], "8b")
    cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads = TINY[:3]
    cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size = 2, TINY[0] // TINY[2], 1024
    return cfg


def linear_params(cfg: Any) -> int:
    d = cfg.hidden_size // cfg.num_attention_heads
    qkv = cfg.hidden_size * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d
    per_layer = qkv + cfg.hidden_size**2 + 3 * cfg.hidden_size * cfg.intermediate_size
    return int(cfg.num_hidden_layers * per_layer + cfg.vocab_size * cfg.hidden_size)


def hbm_read_gbps() -> float:
    x = torch.rand(1 << 30, device="cuda")  # 4 GiB, far beyond L2
    import triton.testing

    return 4 * x.numel() / float(triton.testing.do_bench(lambda: x.sum())) / 1e6


def build(
    directory: Path, device: str, method: str | None, max_batch: int, num_blocks: int
) -> Engine:
    return Engine(
        EngineConfig(
            model=str(directory),
            dtype="bfloat16" if device == "cuda" else "float32",
            device=device,
            load_format="dummy",
            quantization=method,
            max_model_len=PREFILL_TOKENS + 512,
            cache=CacheConfig(num_blocks=num_blocks, enable_prefix_caching=False),
            scheduler=SchedulerConfig(max_num_seqs=max_batch, max_num_batched_tokens=8192),
        )
    )


def weight_bytes(engine: Engine) -> int:
    model = engine.runner.model
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure(engine: Engine, cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    run_pdmesh(engine, prompts(2, 16, cfg.vocab_size), 4)  # warm-up (Triton compile)
    steps = []
    for batch in args.batches:
        batch_prompts = prompts(batch, args.prompt_len, cfg.vocab_size)
        run_pdmesh(engine, batch_prompts, 4)
        run = run_pdmesh(engine, batch_prompts, args.new_tokens)
        tokens = batch * args.new_tokens
        steps.append(
            {
                "batch": batch,
                "ms_per_step": run["ms_per_step"],
                "tokens_per_s": tokens / run["wall_s"],
            }
        )
    prefill_tokens = args.prefill_tokens
    prefill = prefill_tflops(engine, prefill_tokens, linear_params(cfg), cfg)
    return {"decode": steps, "prefill": prefill}


def compare(rows: list[dict[str, Any]]) -> None:
    """Each row's step time and throughput as a ratio of the same shape's bf16 row."""
    base = {r["shape"]: r for r in rows if r["method"] == "bf16" and r.get("fits")}
    for row in rows:
        ref = base.get(row["shape"])
        if not row.get("fits") or ref is None:
            continue
        ref_steps = {s["batch"]: s for s in ref["decode"]}
        for step in row["decode"]:
            peer = ref_steps[step["batch"]]
            step["step_vs_bf16"] = step["ms_per_step"] / peer["ms_per_step"]
            step["tokens_per_s_vs_bf16"] = step["tokens_per_s"] / peer["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["8b", "70b"], choices=["8b", "70b", "tiny"])
    parser.add_argument("--methods", nargs="+", default=["bf16", "int8", "fp8"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=PREFILL_TOKENS)
    parser.add_argument("--layers", type=int, help="fewer layers than the shape's own")
    parser.add_argument("--device", default="cuda", help="cpu only checks the script runs")
    parser.add_argument("--out")
    args = parser.parse_args()
    engine_gpu.DEVICE = args.device
    cuda = args.device == "cuda"
    result: dict[str, Any] = {**environment(), "rows": []}
    if cuda:
        result["hbm_read_gbps"] = hbm_read_gbps()
    max_batch = max(args.batches)
    blocks = max_batch * -(-(args.prompt_len + args.new_tokens) // 16) + 2 * (
        args.prefill_tokens // 16
    )
    for shape in args.shapes:
        cfg = model_config(shape, args.layers)
        for name in args.methods:
            method = None if name == "bf16" else name
            row: dict[str, Any] = {"shape": shape, "layers": cfg.num_hidden_layers, "method": name}
            engine = None
            with tempfile.TemporaryDirectory() as directory:
                cfg.save_pretrained(directory)
                try:
                    engine = build(Path(directory), args.device, method, max_batch, blocks)
                except torch.OutOfMemoryError as error:
                    row.update(fits=False, error=str(error).splitlines()[0])
            if engine is not None:
                row["fits"] = True
                row["weight_gb"] = weight_bytes(engine) / 1e9
                if cuda:
                    row["weight_read_floor_ms"] = (
                        weight_bytes(engine) / result["hbm_read_gbps"] / 1e6
                    )
                    row["device_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
                row.update(measure(engine, cfg, args))
                engine.shutdown()
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            del engine
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    compare(result["rows"])
    for row in result["rows"]:
        for step in row.get("decode", []):
            print(
                f"{row['shape']:>4} {row['method']:>4} batch {step['batch']:>4}: "
                f"{step['ms_per_step']:8.2f} ms/step {step['tokens_per_s']:9.0f} tok/s"
                f"  vs bf16 {step.get('step_vs_bf16', float('nan')):.2f}x step"
                f" {step.get('tokens_per_s_vs_bf16', float('nan')):.2f}x tok/s"
            )
        if row.get("fits"):
            print(f"{row['shape']:>4} {row['method']:>4} prefill: {json.dumps(row['prefill'])}")
        else:
            print(f"{row['shape']:>4} {row['method']:>4} does not fit: {row.get('error')}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
