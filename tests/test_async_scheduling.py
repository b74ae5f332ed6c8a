"""Async scheduling (step N+1 scheduled while step N's greedy tokens are still on the device)
changes when tokens are reported, never which tokens: every output equals the synchronous
engine's, also with stops, sampling rows, preemption and aborts, and no block is leaked.

On the CPU the forward pass is synchronous, so the overlap gains nothing here; the tests force
it on to exercise the bookkeeping that the GPU relies on.
"""

from __future__ import annotations

import pytest

from engine.config import CacheConfig, EngineConfig
from engine.errors import InvalidRequestError
from engine.llm import LLM
from engine.sampling_params import SamplingParams

TOPICS = ["the ocean", "a robot", "coffee", "winter", "trains", "owls", "bread", "chess"]


def make_llm(num_blocks: int | None = None) -> LLM:
    cache = CacheConfig(num_blocks=num_blocks, enable_prefix_caching=False)
    return LLM(EngineConfig(device="cpu", async_scheduling=True, cache=cache))


@pytest.fixture(scope="module")
def async_llm() -> LLM:
    return make_llm()


def chats(llm: LLM) -> list[list[int]]:
    return [llm.encode([{"role": "user", "content": f"One fact about {t}."}]) for t in TOPICS]


def summary(outputs: list) -> list[tuple[list[int], str | None]]:  # type: ignore[type-arg]
    return [(o.token_ids, o.finish_reason) for o in outputs]


def test_greedy_with_every_stop_kind_matches_sync(async_llm: LLM, smol_llm_no_cache: LLM) -> None:
    prompts = chats(async_llm)
    params = [
        SamplingParams(max_tokens=1, temperature=0),
        SamplingParams(max_tokens=2, temperature=0),
        SamplingParams(max_tokens=40, temperature=0),  # ends on EOS (<|im_end|>) first
        SamplingParams(max_tokens=7, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0, stop=[" the"]),
        SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[13]),
        SamplingParams(max_tokens=3, temperature=0),
        SamplingParams(max_tokens=25, temperature=0),
    ]
    ours = async_llm.generate(prompts, params)
    theirs = smol_llm_no_cache.generate(prompts, params)
    assert summary(ours) == summary(theirs)
    assert {o.finish_reason for o in ours} >= {"stop", "length"}
    assert async_llm.engine.num_free_blocks == async_llm.engine.runner.num_blocks


def test_rows_needing_the_host_fall_back_and_match(async_llm: LLM, smol_llm_no_cache: LLM) -> None:
    prompts = chats(async_llm)[:4]
    params = [
        SamplingParams(max_tokens=12, temperature=0),
        SamplingParams(max_tokens=12, temperature=0.8, seed=7),
        SamplingParams(max_tokens=12, temperature=0, logprobs=2),
        SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.3),
    ]
    ours = async_llm.generate(prompts, params)
    theirs = smol_llm_no_cache.generate(prompts, params)
    assert summary(ours) == summary(theirs)
    assert [len(o.logprobs) for o in ours] == [0, 0, 12, 0]


def test_tokens_stay_on_the_device_between_steps(async_llm: LLM) -> None:
    engine = async_llm.engine
    request_id = async_llm.add_request(
        chats(async_llm)[0], SamplingParams(max_tokens=8, temperature=0)
    )
    reported = [out for _ in range(3) for out, _ in async_llm.step()]
    seq = engine.requests[request_id]
    assert seq.has_pending_token, "the newest token is still a placeholder after the step"
    assert len(reported[-1].token_ids) == len(seq.output_token_ids) - 1
    assert async_llm.abort(request_id)
    assert engine.num_free_blocks == engine.runner.num_blocks
    assert async_llm.step() == []  # the aborted request's device token is dropped


def test_preemption_and_abort_match_sync_and_free_everything(smol_llm_no_cache: LLM) -> None:
    llm = make_llm(num_blocks=40)  # 8 prompts of ~30 tokens + 48 new each need ~48 blocks
    prompts = chats(llm)
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    ids = [llm.add_request(p, params) for p in prompts]
    done = {}
    steps = 0
    while len(done) < len(ids) - 1:
        steps += 1
        if steps == 10:
            assert llm.abort(ids[3])
        for output, _ in llm.step():
            if output.finished:
                done[output.request_id] = output
    assert sum(s.num_preemptions for s in llm.engine.requests.values()) == 0  # all retired
    assert llm.engine.num_free_blocks == 40
    expected = smol_llm_no_cache.generate(prompts, params)
    for index, request_id in enumerate(ids):
        if index != 3:
            assert done[request_id].token_ids == expected[index].token_ids
    assert ids[3] not in done


def test_a_request_reported_twice_in_one_step_gets_one_output(async_llm: LLM) -> None:
    """A deferred token read back in a step that must sample on the host (a sampling request
    joined) comes out with that step's own token in one output, not two."""
    engine = async_llm.engine
    greedy = engine.add_request(chats(async_llm)[0], SamplingParams(max_tokens=8, temperature=0))
    for _ in range(3):
        engine.step()
    assert engine.requests[greedy].has_pending_token
    engine.add_request(chats(async_llm)[1], SamplingParams(max_tokens=4, temperature=0.7, seed=1))
    mine = [out for out in engine.step() if out.request_id == greedy]
    assert len(mine) == 1 and len(mine[0].new_token_ids) == 2
    while engine.has_unfinished:
        engine.step()
    assert engine.num_free_blocks == engine.runner.num_blocks


def test_out_of_range_first_token_is_refused(async_llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="output_token_ids out of range"):
        async_llm.engine.add_request([1, 2, 3], SamplingParams(max_tokens=4), output_token_ids=[-1])
