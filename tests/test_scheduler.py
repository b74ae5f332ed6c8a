"""Continuous batching under a small KV budget: everything finishes, nothing leaks, preempted
requests produce exactly the tokens they would have produced anyway."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine.config import CacheConfig, EngineConfig, MLFQConfig, SchedulerConfig
from engine.errors import InvalidRequestError
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.conftest import hf_greedy
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama3", tmp_path_factory.mktemp("sched"))


def tiny_llm(
    directory: Path,
    num_blocks: int,
    max_num_seqs: int = 32,
    policy: str = "fcfs",
    swap_space_gib: float = 0.0,
) -> LLM:
    # Small MLFQ quanta so that demotions, promotions and preemptions all happen.
    mlfq = MLFQConfig(base_quantum=3, join_prompt_tokens=16, promotion_period=6)
    scheduler = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=256, policy=policy, mlfq=mlfq
    )
    return LLM(
        EngineConfig(
            model=str(directory),
            device="cpu",
            cache=CacheConfig(block_size=8, num_blocks=num_blocks, swap_space_gib=swap_space_gib),
            scheduler=scheduler,
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


@pytest.mark.parametrize("policy", ["priority", "mlfq"])
def test_policies_preempt_yet_keep_greedy_tokens(tiny_dir: Path, policy: str) -> None:
    """Under a tight cache the policy reorders and preempts requests; each still produces
    the tokens it produces alone, and Hugging Face's greedy tokens for a few of them."""
    prompts, params = workload(40)
    rng = random.Random(1)
    llm = tiny_llm(tiny_dir, num_blocks=24, max_num_seqs=8, policy=policy)
    ids = [
        llm.add_request(p, sp, priority=rng.randrange(4))
        for p, sp in zip(prompts, params, strict=True)
    ]
    seqs = [llm.engine.requests[i] for i in ids]
    done = {}
    while len(done) < len(ids):
        done.update((out.request_id, out) for out, _ in llm.step() if out.finished)
    assert sum(s.num_preemptions for s in seqs) > 0, "the budget should force preemption"
    allocator = llm.engine.block_manager.allocator
    assert allocator.num_used == 0 and set(allocator.ref_counts) == {0}
    expected = tiny_llm(tiny_dir, num_blocks=4096).generate(prompts, params)
    assert [done[i].token_ids for i in ids] == [o.token_ids for o in expected]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    for index in (0, 1, 2):
        reference = hf_greedy(hf, prompts[index], params[index].max_tokens)
        assert done[ids[index]].token_ids[: len(reference)] == reference


@pytest.mark.parametrize("policy", ["fcfs", "mlfq"])
def test_swapped_requests_resume_with_the_same_greedy_tokens(tiny_dir: Path, policy: str) -> None:
    prompts, params = workload(40)
    llm = tiny_llm(tiny_dir, num_blocks=24, max_num_seqs=8, policy=policy, swap_space_gib=0.01)
    swapper = llm.engine.swapper
    assert swapper is not None and swapper.space.allocator.num_blocks > 24
    outputs = llm.generate(prompts, params)
    assert swapper.num_swapped_out > 0 and swapper.num_swapped_in == swapper.num_swapped_out
    assert swapper.space.allocator.num_free == swapper.space.allocator.num_blocks
    assert llm.engine.block_manager.allocator.num_used == 0
    expected = tiny_llm(tiny_dir, num_blocks=4096).generate(prompts, params)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]
