"""pdmesh vs Hugging Face ``generate`` on the CPU, default model, same run.

    python -m bench.engine_cpu [--batches 1 16] [--new-tokens 64] [--out bench/results/x.json]

Both sides decode greedily for exactly ``--new-tokens`` tokens per prompt (pdmesh with
``ignore_eos``, HF with ``min_new_tokens``); tokens/s counts generated tokens over wall time,
prefill included.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from bench.common import environment, write_json
from engine.config import EngineConfig
from engine.llm import LLM
from engine.model_source import default_model_path
from engine.sampling_params import SamplingParams

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle. "


def prompts(llm: LLM, batch: int) -> list[list[int]]:
    # Mixed lengths, as real traffic has.
    return [llm.encode(PROMPT * (1 + i % 3)) for i in range(batch)]


def run_pdmesh(llm: LLM, batch_prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(batch_prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == new_tokens for o in outputs)
    return elapsed


def run_hf(model: Any, batch_prompts: list[list[int]], new_tokens: int, pad_id: int) -> float:
    width = max(len(p) for p in batch_prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch_prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch_prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
    elapsed = time.perf_counter() - start
    assert out.shape[1] == width + new_tokens
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    llm = LLM(EngineConfig(device="cpu", dtype="float32"))
    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    run_pdmesh(llm, prompts(llm, 2), 4)  # warm-up both
    run_hf(hf, prompts(llm, 2), 4, pad_id=2)

    rows = []
    print(f"{'batch':>5} {'pdmesh tok/s':>13} {'HF tok/s':>10} {'ratio':>7}")
    for batch in args.batches:
        batch_prompts = prompts(llm, batch)
        total = batch * args.new_tokens
        ours = total / run_pdmesh(llm, batch_prompts, args.new_tokens)
        theirs = total / run_hf(hf, batch_prompts, args.new_tokens, pad_id=2)
        rows.append(
            {
                "batch": batch,
                "new_tokens": args.new_tokens,
                "pdmesh_tokens_per_s": round(ours, 1),
                "hf_tokens_per_s": round(theirs, 1),
                "ratio": round(ours / theirs, 2),
            }
        )
        print(f"{batch:>5} {ours:>13.1f} {theirs:>10.1f} {ours / theirs:>6.2f}x")
    write_json(args.out, {**environment(), "model": path.name, "results": rows})


if __name__ == "__main__":
    main()
