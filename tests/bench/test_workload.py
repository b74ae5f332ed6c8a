"""Benchmark workloads: deterministic for a seed, lengths where their distributions put them."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from pdmesh.bench.workload import (
    DISTRIBUTIONS,
    FIRST_PLAIN_TOKEN,
    BenchRequest,
    WorkloadSpec,
    make_workload,
)

VOCAB = 49152


def test_same_seed_same_requests_other_seed_other_requests() -> None:
    spec = WorkloadSpec("sharegpt", num_requests=20, seed=7)
    first = make_workload(spec, VOCAB, 8192)
    assert first == make_workload(spec, VOCAB, 8192)
    assert first != make_workload(WorkloadSpec("sharegpt", num_requests=20, seed=8), VOCAB, 8192)
    assert all(FIRST_PLAIN_TOKEN <= t < VOCAB for r in first for t in r.prompt_token_ids)


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_lengths_follow_the_distribution(name: str) -> None:
    inputs, outputs = DISTRIBUTIONS[name]
    requests = make_workload(WorkloadSpec(name, num_requests=2000, seed=1), VOCAB, 1 << 20)
    input_lens = [r.prompt_len for r in requests]
    output_lens = [r.max_tokens for r in requests]
    assert inputs.low <= min(input_lens) and max(input_lens) <= inputs.high
    assert outputs.low <= min(output_lens) and max(output_lens) <= outputs.high
    # Medians of 2,000 log-normal draws are within 10% of the distribution's.
    assert statistics.median(input_lens) == pytest.approx(inputs.median, rel=0.1)
    assert statistics.median(output_lens) == pytest.approx(outputs.median, rel=0.1)


def test_summarization_is_long_in_short_out_and_scale_and_fixed_lengths_apply() -> None:
    summaries = make_workload(WorkloadSpec("summarization", num_requests=50), VOCAB, 1 << 20)
    assert all(r.prompt_len > r.max_tokens for r in summaries)
    scaled = make_workload(
        WorkloadSpec("sharegpt", num_requests=200, length_scale=0.25), VOCAB, 1 << 20
    )
    assert max(r.prompt_len for r in scaled) <= 256 and max(r.max_tokens for r in scaled) <= 256
    fixed = make_workload(
        WorkloadSpec("code", num_requests=5, input_len=33, output_len=3), VOCAB, 1 << 20
    )
    assert {(r.prompt_len, r.max_tokens) for r in fixed} == {(33, 3)}


def test_prompt_and_output_fit_the_model_length() -> None:
    requests = make_workload(WorkloadSpec("summarization", num_requests=30), VOCAB, 600)
    assert all(r.prompt_len + r.max_tokens <= 600 for r in requests)


def test_jsonl_prompts_cycle_in_order(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "Hello there", "max_tokens": 5}, {"prompt_token_ids": [10, 11, 12]}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    spec = WorkloadSpec("jsonl", num_requests=3, path=str(path), output_len=9)
    assert make_workload(spec, VOCAB, 8192) == [
        BenchRequest(5, prompt="Hello there"),
        BenchRequest(9, prompt_token_ids=(10, 11, 12)),
        BenchRequest(5, prompt="Hello there"),
    ]


def test_bad_workloads_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        WorkloadSpec("imagenet")
    with pytest.raises(ValueError, match="needs a path"):
        WorkloadSpec("jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not JSON"):
        make_workload(WorkloadSpec("jsonl", path=str(bad)), VOCAB, 8192)
    both = tmp_path / "both.jsonl"
    both.write_text('{"prompt": "a", "prompt_token_ids": [1]}\n')
    with pytest.raises(ValueError, match=r"both\.jsonl:1: .*exactly one"):
        make_workload(WorkloadSpec("jsonl", path=str(both)), VOCAB, 8192)
