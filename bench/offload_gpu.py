"""Models larger than the GPU: decode throughput with weights streamed from host memory.

    python -m bench.offload_gpu --shape 70b --budget-gib 40 --out bench/results/offload_h200.json
    python -m bench.offload_gpu --shape 180b --layers 23 --budget-gib 32 --out ...
    python -m bench.offload_gpu --shape tiny --device cpu          # the CPU smoke run

Random bf16 weights (``load_format=dummy``), greedy decoding with ``ignore_eos``. In the same
run it measures pinned host-to-device bandwidth (the link), then per batch size: ms per decode
step, tokens/s, ms per token as in the BLOOM inference blog's tables (step time / batch), and
the link bound: streamed bytes per step / bandwidth, i.e. the fastest a step can be when every
offloaded layer crosses the link once. ``link_efficiency`` = bound / measured step time (the
target at the largest batch is >= 0.8).

The 180B-class shape is a BLOOM-176B-sized Llama-family decoder (hidden 14336, 112 heads, MHA,
a gated MLP of the same parameter count, 70 layers, 182B parameters). Its 70 layers (364 GB in
bf16) do not fit an H200 host's 128 GiB of RAM, so the run keeps ``--layers`` of them (23: 3
resident, 20 = 93 GiB pinned on the host) and reports the step time extrapolated to 70 layers
with the same resident count, labelled as such.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import environment, write_json
from engine.config import CacheConfig, EngineConfig, OffloadConfig, SchedulerConfig
from engine.engine import Engine
from engine.sampling_params import SamplingParams

GIB = 1 << 30
#: name -> (hidden, intermediate, heads, kv heads, layers, vocab, tied embeddings)
SHAPES: dict[str, tuple[int, int, int, int, int, int, bool]] = {
    "70b": (8192, 28672, 64, 8, 80, 128256, False),
    "180b": (14336, 38912, 112, 112, 70, 250880, True),
    "tiny": (256, 768, 8, 4, 8, 1024, False),
}


def write_config(directory: Path, shape: str, layers: int | None) -> int:
    hidden, inter, heads, kv_heads, num_layers, vocab, tied = SHAPES[shape]
    config = {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers or num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tied,
    }
    (directory / "config.json").write_text(json.dumps(config))
    return num_layers


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def link_bandwidth(device: str, nbytes: int) -> float:
    """Pinned host -> device copy, bytes/s (the best of five)."""
    pin = device.startswith("cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        target.copy_(host, non_blocking=True)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def decode_step_ms(engine: Engine, batch: int, prompt_len: int, steps: int, device: str) -> float:
    """Mean ms of ``steps`` decode steps at ``batch`` running sequences (after prefill)."""
    params = SamplingParams(max_tokens=steps + 3, temperature=0, ignore_eos=True)
    generator = torch.Generator().manual_seed(batch)
    vocab = engine.model_config.vocab_size
    prompts = torch.randint(0, vocab, (batch, prompt_len), generator=generator).tolist()
    ids = [engine.add_request(prompt, params) for prompt in prompts]
    while any(engine.requests[i].num_computed_tokens < prompt_len for i in ids):
        engine.step()  # prefill, in as many chunks as the token budget needs
    engine.step()  # the first decode step (async scheduling starts its overlap here)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(device)
    elapsed = (time.perf_counter() - start) / steps
    while engine.has_unfinished:
        engine.step()
    return elapsed * 1e3


def build(args: argparse.Namespace, directory: Path, max_batch: int) -> Engine:
    longest = args.prompt_len + args.steps + 8
    blocks = max_batch * -(-longest // 16) + 64
    return Engine(
        EngineConfig(
            model=str(directory),
            dtype="bfloat16" if args.device.startswith("cuda") else "float32",
            device=args.device,
            load_format="dummy",
            max_model_len=longest,
            cache=CacheConfig(num_blocks=blocks, enable_prefix_caching=False),
            scheduler=SchedulerConfig(
                max_num_seqs=max_batch,
                max_num_batched_tokens=max(2048, min(16384, max_batch * args.prompt_len)),
            ),
            offload=OffloadConfig(
                args.offload, args.budget_gib, args.prefetch_depth, args.disk_dir
            ),
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="70b")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's)")
    parser.add_argument("--budget-gib", type=float, default=40.0)
    parser.add_argument("--offload", choices=["cpu", "disk"], default="cpu")
    parser.add_argument("--disk-dir")
    parser.add_argument("--prefetch-depth", type=int)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256, 512])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.shape == "tiny" and args.budget_gib == 40.0:
        args.budget_gib = 0.02  # 4 of 8 layers resident, 4 streamed

    probe_bytes = (1 << 30) if args.device.startswith("cuda") else 64 << 20
    bandwidth = link_bandwidth(args.device, probe_bytes)
    print(f"pinned host->device: {bandwidth / 1e9:.1f} GB/s")
    with tempfile.TemporaryDirectory() as tmp:
        full_layers = write_config(Path(tmp), args.shape, args.layers)
        start = time.perf_counter()
        engine = build(args, Path(tmp), max(args.batches))
        load_s = time.perf_counter() - start
        cuda = args.device.startswith("cuda")
        device_gib = torch.cuda.memory_allocated() / GIB if cuda else None
        stream = engine.runner.weight_stream
        layers = engine.model_config.num_hidden_layers
        streamed = len(stream.layers) if stream else 0
        layer_bytes = stream.bytes_per_layer if stream else 0
        rows: list[dict[str, Any]] = []
        bound_ms = streamed * layer_bytes / bandwidth * 1e3
        for batch in args.batches:
            step_ms = decode_step_ms(engine, batch, args.prompt_len, args.steps, args.device)
            row = {
                "batch": batch,
                "ms_per_step": step_ms,
                "tokens_per_s": batch / step_ms * 1e3,
                "ms_per_token": step_ms / batch,
                "link_bound_ms_per_step": bound_ms,
                "link_bound_tokens_per_s": batch / bound_ms * 1e3 if bound_ms else None,
                "link_efficiency": bound_ms / step_ms if bound_ms else None,
            }
            if layers < full_layers and streamed:  # the extra layers would stream too
                extra_ms = (full_layers - layers) * layer_bytes / bandwidth * 1e3
                row["extrapolated_full_model_ms_per_step"] = step_ms + extra_ms
                row["extrapolated_full_model_ms_per_token"] = (step_ms + extra_ms) / batch
            rows.append(row)
            print(
                f"batch {batch:4d}: {step_ms:9.1f} ms/step  {row['tokens_per_s']:9.1f} tok/s  "
                f"{row['ms_per_token']:8.2f} ms/token  link bound {bound_ms:8.1f} ms "
                f"({(row['link_efficiency'] or 0) * 100:.0f}%)"
            )
        result = {
            **environment(),
            "shape": args.shape,
            "layers": layers,
            "shape_layers": full_layers,
            "offload": args.offload,
            "gpu_weight_budget_gib": args.budget_gib,
            "resident_layers": layers - streamed,
            "streamed_layers": streamed,
            "prefetch_depth": stream.depth if stream else None,
            "layer_gib": layer_bytes / GIB,
            "streamed_gib_per_step": streamed * layer_bytes / GIB,
            "device_gib_after_load": device_gib,
            "link_gb_per_s": bandwidth / 1e9,
            "load_s": load_s,
            "prompt_len": args.prompt_len,
            "rows": rows,
        }
        engine.shutdown()
    write_json(args.out, result)


if __name__ == "__main__":
    main()
