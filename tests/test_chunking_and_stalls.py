"""Chunked prefill on a real (tiny, random) model: the token budget changes how prompts are
split, never the tokens generated; and decodes keep streaming, one token every iteration,
while a long prompt is prefilled beside them (Sarathi-Serve's stall-free batching)."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine import Engine, StepOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerOutput
from tests.conftest import hf_greedy
from tests.tiny_models import load_hf, save_tiny_model

Plan = list[tuple[str, int, int]]
LONG_PROMPT = 2000


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny model gains nothing from intra-op threads, and on a busy machine their
    synchronisation per op can slow these many small steps down tenfold."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama3 model with room for a 2,000-token prompt (Llama has no learned position
    table, so only the limit in config.json changes)."""
    directory = save_tiny_model("llama3", tmp_path_factory.mktemp("long_context"))
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["max_position_embeddings"] = 4096
    config_path.write_text(json.dumps(config))
    return directory


def make_engine(model: Path, budget: int, max_model_len: int, num_blocks: int) -> Engine:
    return Engine(
        EngineConfig(
            model=str(model),
            device="cpu",
            max_model_len=max_model_len,
            cache=CacheConfig(block_size=16, num_blocks=num_blocks),
            scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=budget),
        )
    )


def record_plans(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[Plan]:
    """Each step's chunks as (request, start, end), recorded as the scheduler hands them out."""
    plans: list[Plan] = []
    schedule = engine.scheduler.schedule

    def recording_schedule() -> SchedulerOutput:
        out = schedule()
        plans.append([(c.seq.request_id, c.start, c.end) for c in out.chunks])
        return out

    monkeypatch.setattr(engine.scheduler, "schedule", recording_schedule)
    return plans


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def run_all(engine: Engine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished:
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def test_greedy_tokens_do_not_depend_on_the_token_budget(
    long_context_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(7)
    lengths = [1, 5, 16, 17, 40, 64, 100, 150, 255, 300]
    prompts = [[rng.randrange(512) for _ in range(n)] for n in lengths]
    max_tokens = [rng.randint(4, 12) for _ in prompts]
    results = {}
    longest_prompt_chunks = {}
    for budget in (16, 64, 512):
        engine = make_engine(long_context_model, budget, max_model_len=512, num_blocks=256)
        plans = record_plans(engine, monkeypatch)
        for i, (prompt, n) in enumerate(zip(prompts, max_tokens, strict=True)):
            engine.add_request(prompt, greedy(n), request_id=str(i))
        results[budget] = run_all(engine)
        assert all(sum(end - start for _, start, end in plan) <= budget for plan in plans)
        longest_prompt_chunks[budget] = [
            (start, end) for plan in plans for r, start, end in plan if r == "9" and start < 300
        ]
        assert engine.block_manager.allocator.num_used == 0
    assert [len(results[16][str(i)]) for i in range(len(prompts))] == max_tokens
    # The 300-token prompt: many small chunks, a few larger ones, then all at once.
    for budget, chunks in longest_prompt_chunks.items():
        assert chunks[0][0] == 0 and chunks[-1][1] == 300
        assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))  # contiguous
        assert all(end - start <= budget for start, end in chunks)
    assert len(longest_prompt_chunks[16]) >= 300 / 16
    assert len(longest_prompt_chunks[64]) >= 300 / 64
    assert longest_prompt_chunks[512] == [(0, 300)]
    assert results[16] == results[64] == results[512]
    # ... and they are the model's own greedy tokens (Hugging Face, whole prompt at once).
    hf = load_hf(long_context_model)
    for i in (0, 6, 9):
        assert results[16][str(i)] == hf_greedy(hf, prompts[i], max_tokens[i])


def test_decodes_get_a_token_every_iteration_while_a_long_prompt_is_prefilled(
    long_context_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget, num_streams, stream_tokens = 256, 8, 16
    engine = make_engine(long_context_model, budget, max_model_len=2100, num_blocks=256)
    plans = record_plans(engine, monkeypatch)
    rng = random.Random(11)
    stream_prompts = [[rng.randrange(512) for _ in range(20)] for _ in range(num_streams)]
    streams = [str(i) for i in range(num_streams)]
    for request_id, prompt in zip(streams, stream_prompts, strict=True):
        engine.add_request(prompt, greedy(stream_tokens), request_id=request_id)

    steps: list[list[StepOutput]] = [engine.step()]  # all 8 prompts fit one step
    assert plans[0] == [(r, 0, 20) for r in streams]
    steps.append(engine.step())  # 8 pure decodes
    long_prompt = [rng.randrange(512) for _ in range(LONG_PROMPT)]
    engine.add_request(long_prompt, greedy(2), request_id="long")
    while engine.has_unfinished:
        steps.append(engine.step())

    # Every stream gets exactly one token in every step until it finishes: no gap, no stall.
    for request_id in streams:
        got = [[o for o in outs if o.request_id == request_id] for outs in steps]
        per_step = [sum(len(o.new_token_ids) for o in outs) for outs in got]
        assert per_step == [1] * stream_tokens + [0] * (len(steps) - stream_tokens)

    # The prompt is prefilled in chunks that fill what the 8 decodes leave of the budget.
    long_chunks = [(s, e) for plan in plans for r, s, e in plan if r == "long"]
    room = budget - num_streams
    prefill = [(s, e) for s, e in long_chunks if s < LONG_PROMPT]
    assert prefill == [(i * room, min((i + 1) * room, LONG_PROMPT)) for i in range(9)]
    assert all(e - s <= room for s, e in prefill)
    # Each step of the prefill carried all 8 decodes beside the chunk.
    for plan in plans[2:11]:
        assert [r for r, _, _ in plan] == [*streams, "long"]
        assert sum(e - s for _, s, e in plan) <= budget
    assert engine.block_manager.allocator.num_used == 0

    # The long prompt beside them did not change what the streams generated.
    alone = make_engine(long_context_model, budget, max_model_len=2100, num_blocks=256)
    for request_id, prompt in zip(streams, stream_prompts, strict=True):
        alone.add_request(prompt, greedy(stream_tokens), request_id=request_id)
    expected = run_all(alone)
    for request_id in streams:
        got_tokens = [
            t for outs in steps for o in outs if o.request_id == request_id for t in o.new_token_ids
        ]
        assert got_tokens == expected[request_id]
