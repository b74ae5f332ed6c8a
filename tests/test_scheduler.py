"""Continuous batching under a small KV budget: everything finishes, nothing leaks, preempted
requests produce exactly the tokens they would have produced anyway."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.errors import InvalidRequestError
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama3", tmp_path_factory.mktemp("sched"))


def tiny_llm(directory: Path, num_blocks: int, max_num_seqs: int = 32) -> LLM:
    return LLM(
        EngineConfig(
            model=str(directory),
            device="cpu",
            cache=CacheConfig(block_size=8, num_blocks=num_blocks),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=256),
        )
    )


def workload(count: int) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(0)
    prompts = [[rng.randrange(512) for _ in range(rng.randint(1, 70))] for _ in range(count)]
    params = [SamplingParams(max_tokens=rng.randint(1, 30), temperature=0) for _ in range(count)]
    return prompts, params


def test_200_requests_finish_and_free_every_block(tiny_dir: Path) -> None:
    prompts, params = workload(200)
    tight = tiny_llm(tiny_dir, num_blocks=24)
    outputs = tight.generate(prompts, params)
    assert all(o.finish_reason == "length" for o in outputs)
    assert [len(o.token_ids) for o in outputs] == [p.max_tokens for p in params]
    allocator = tight.engine.block_manager.allocator
    assert allocator.num_used == 0 and set(allocator.ref_counts) == {0}
    preempted = tight.engine.scheduler  # nothing left behind in the queues either
    assert not preempted.waiting and not preempted.running
    ample = tiny_llm(tiny_dir, num_blocks=4096)
    expected = ample.generate(prompts, params)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]


def test_preemption_happens_and_keeps_greedy_tokens(tiny_dir: Path) -> None:
    llm = tiny_llm(tiny_dir, num_blocks=12, max_num_seqs=8)
    prompts = [[(7 * i + j) % 512 for j in range(30)] for i in range(6)]
    params = SamplingParams(max_tokens=40, temperature=0)
    ids = [llm.add_request(p, params) for p in prompts]
    seqs = [llm.engine.requests[i] for i in ids]
    done = {}
    while len(done) < len(ids):
        for out, _ in llm.step():
            if out.finished:
                done[out.request_id] = out
    assert sum(s.num_preemptions for s in seqs) > 0, "the budget should force preemption"
    alone = tiny_llm(tiny_dir, num_blocks=4096)
    for request_id, prompt in zip(ids, prompts, strict=True):
        assert done[request_id].token_ids == alone.generate([prompt], params)[0].token_ids


def test_request_that_can_never_fit_is_rejected(tiny_dir: Path) -> None:
    llm = tiny_llm(tiny_dir, num_blocks=4)
    with pytest.raises(InvalidRequestError, match="needs 5 KV blocks but the cache holds 4"):
        llm.generate([[1] * 30], SamplingParams(max_tokens=10))
    assert llm.engine.block_manager.allocator.num_used == 0
    # one that fits still runs afterwards
    assert len(llm.generate([[1] * 20], SamplingParams(max_tokens=5))[0].token_ids) == 5


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], SamplingParams(), "prompt is empty"),
        ([1, 512], SamplingParams(), "out of range"),
        ([1] * 1000, SamplingParams(max_tokens=100), "exceeds the maximum model length"),
    ],
)
def test_bad_requests_are_rejected(
    tiny_dir: Path, prompt: list[int], params: SamplingParams, message: str
) -> None:
    llm = tiny_llm(tiny_dir, num_blocks=256)
    with pytest.raises(InvalidRequestError, match=message):
        llm.engine.add_request(prompt, params)
    assert not llm.engine.has_unfinished


def test_abort_frees_blocks(tiny_dir: Path) -> None:
    llm = tiny_llm(tiny_dir, num_blocks=64)
    request_id = llm.add_request(list(range(50)), SamplingParams(max_tokens=100))
    llm.step()
    assert llm.engine.block_manager.allocator.num_used > 0
    assert llm.abort(request_id)
    assert llm.engine.block_manager.allocator.num_used == 0
    assert not llm.abort(request_id) and not llm.engine.has_unfinished
