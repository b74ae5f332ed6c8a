"""Prefill and decode engines joined only by the KV store, without gRPC: the hand-off itself."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine import Engine
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from kvstore.embedded import EmbeddedKVStore
from tests.tiny_models import save_tiny_model

GREEDY = SamplingParams(max_tokens=24, temperature=0)


def run(engine: Engine, **request: object) -> list[int]:
    request_id = engine.add_request(**request)  # type: ignore[arg-type]
    tokens: list[int] = []
    while engine.has_unfinished:
        for output in engine.step():
            if output.request_id == request_id:
                tokens += output.new_token_ids
                last = output
    assert last.finish_reason is not None
    return tokens


@pytest.fixture(scope="module")
def engines() -> tuple[Engine, Engine, Engine, EmbeddedKVStore]:
    store = EmbeddedKVStore(capacity_blocks=512)
    config = EngineConfig(device="cpu")
    return Engine(config, store, True), Engine(config, store, True), Engine(config, store), store


def prefill(engine: Engine, prompt: list[int], params: SamplingParams, request_id: str):
    first_only = dataclasses.replace(params, max_tokens=1)
    engine.add_request(prompt, first_only, request_id)
    while engine.has_unfinished:
        for output in engine.step():
            if output.finish_reason is not None:
                return output
    raise AssertionError("prefill did not finish")


@pytest.mark.parametrize("seeded", [False, True])
def test_prefill_then_decode_equals_one_engine(
    engines: tuple[Engine, Engine, Engine, EmbeddedKVStore], smol_llm: LLM, seeded: bool
) -> None:
    prefill_engine, _, decode_engine, store = engines
    params = GREEDY if not seeded else SamplingParams(max_tokens=24, temperature=0.9, seed=5)
    prompt = smol_llm.encode([{"role": "user", "content": f"Describe a sunrise ({seeded})."}])
    expected = smol_llm.generate([prompt], params)[0].token_ids
    request_id = f"pd-{seeded}"
    first = prefill(prefill_engine, prompt, params, request_id)
    assert first.kv_hashes is not None and len(first.kv_hashes) == -(-len(prompt) // 16)
    assert store.stats().num_pinned_blocks == len(first.kv_hashes)
    assert prefill_engine.block_manager.allocator.num_used == 0
    rest = run(
        decode_engine,
        prompt_token_ids=prompt,
        params=params,
        request_id=request_id,
        output_token_ids=[first.new_token_ids[0]],
        kv_import=first.kv_hashes,
    )
    assert first.new_token_ids + rest == expected
    assert store.stats().num_pinned_blocks == 0, "the decode worker released its pins"
    assert decode_engine.block_manager.allocator.num_used == 0


def test_second_prefill_worker_reuses_blocks_from_the_store(
    engines: tuple[Engine, Engine, Engine, EmbeddedKVStore], smol_llm: LLM
) -> None:
    worker_a, worker_b, _, store = engines
    prompt = smol_llm.encode("Shared context: " + "alpha beta gamma delta. " * 20)
    first = prefill(worker_a, prompt, GREEDY, "a")
    store.release("a")
    second = prefill(worker_b, prompt, GREEDY, "b")  # worker b never saw this prompt
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == (len(prompt) - 1) // 16 * 16
    assert second.new_token_ids == first.new_token_ids
    store.release("b")
    assert store.stats().num_pinned_blocks == 0


def test_hand_off_with_wrong_block_count_is_rejected(
    engines: tuple[Engine, Engine, Engine, EmbeddedKVStore],
) -> None:
    from engine.errors import InvalidRequestError

    decode_engine = engines[2]
    with pytest.raises(InvalidRequestError, match="names 1 blocks"):
        decode_engine.add_request([1] * 40, GREEDY, "bad", [5], [b"x" * 16])


def test_preempted_decode_resumes_from_store_blocks(tmp_path: Path) -> None:
    directory = str(save_tiny_model("llama3", tmp_path))
    store = EmbeddedKVStore(capacity_blocks=256)
    cache = CacheConfig(block_size=8, enable_prefix_caching=False)
    prefill_engine = Engine(EngineConfig(model=directory, device="cpu", cache=cache), store, True)
    tight = dataclasses.replace(cache, num_blocks=14)
    decode_engine = Engine(EngineConfig(model=directory, device="cpu", cache=tight), store)
    reference = LLM(EngineConfig(model=directory, device="cpu", cache=cache))
    prompts = [[(5 * i + j) % 512 for j in range(30)] for i in range(4)]
    params = SamplingParams(max_tokens=20, temperature=0)
    expected = reference.generate(prompts, params)
    for index, prompt in enumerate(prompts):
        first = prefill(prefill_engine, prompt, params, f"r{index}")
        decode_engine.add_request(prompt, params, f"r{index}", first.new_token_ids, first.kv_hashes)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(4)}
    seqs = list(decode_engine.requests.values())
    while decode_engine.has_unfinished:
        for output in decode_engine.step():
            tokens[output.request_id] += output.new_token_ids
    assert sum(s.num_preemptions for s in seqs) > 0, "14 blocks of 8 cannot hold 4 x 50 tokens"
    loaded = decode_engine.kv.num_loaded_blocks  # type: ignore[union-attr]
    assert loaded > 4 * 4, "resumed requests reloaded prompt blocks from the store"
    for index, want in enumerate(expected):
        assert want.token_ids[0:1] + tokens[f"r{index}"] == want.token_ids
    assert decode_engine.block_manager.allocator.num_used == 0
    assert store.stats().num_pinned_blocks == 0


def test_aborted_prefill_releases_its_store_pins(tmp_path: Path) -> None:
    directory = str(save_tiny_model("llama3", tmp_path))
    store = EmbeddedKVStore(capacity_blocks=64)
    config = EngineConfig(
        model=directory, device="cpu", scheduler=SchedulerConfig(max_num_batched_tokens=64)
    )
    engine = Engine(config, store, True)
    engine.add_request(list(range(200)), SamplingParams(max_tokens=1), "long")
    engine.step()  # the first 64-token chunk: 4 full blocks published and pinned
    assert store.stats().num_pinned_blocks == 4
    assert engine.abort("long")
    assert store.stats().num_pinned_blocks == 0
    assert engine.block_manager.allocator.num_used == 0
