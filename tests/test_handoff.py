"""The hand-off between engines joined by a store, without gRPC: pipelined pulls while the
prefill runs, aborts in the middle of one, and finished requests left as prefix cache."""

from __future__ import annotations

import dataclasses

import pytest

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine import Engine, StepOutput
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from kvstore.block_hash import hash_full_blocks
from kvstore.embedded import EmbeddedKVStore
from tests.tiny_models import save_tiny_model

BLOCK = 8
CHUNK = 32
PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_model("llama3", tmp_path_factory.mktemp("tiny")))


def config(model_dir: str, **cache: object) -> EngineConfig:
    return EngineConfig(
        model=model_dir,
        device="cpu",
        cache=CacheConfig(block_size=BLOCK, **cache),  # type: ignore[arg-type]
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=CHUNK),
    )


def prefill_step(engine: Engine) -> StepOutput | None:
    """One prefill iteration; the final output once the first token is sampled."""
    for output in engine.step():
        if output.finish_reason is not None:
            return output
    return None


def decode_all(engine: Engine, request_id: str) -> list[int]:
    tokens: list[int] = []
    while engine.has_unfinished:
        for output in engine.step():
            if output.request_id == request_id:
                tokens += output.new_token_ids
    return tokens


def test_pipelined_pull_follows_the_prefill_and_decodes_the_same_tokens(model_dir: str) -> None:
    store = EmbeddedKVStore(capacity_blocks=256)
    prefill = Engine(config(model_dir), store, publish_kv=True)
    decode = Engine(config(model_dir), store)
    prompt = [(7 * i + 3) % 500 for i in range(100)]  # 4 chunks of 32: 12 full blocks + 4
    expected = LLM(config(model_dir)).generate([prompt], PARAMS)[0].token_ids
    prefill.add_request(prompt, dataclasses.replace(PARAMS, max_tokens=1), "r")
    decode.prefetch(prompt, PARAMS, "r")
    assert decode.block_manager.allocator.num_used == 13, "blocks for the whole prompt"
    kv = decode.kv
    assert kv is not None and kv.path == "in-process"
    pulled_during_prefill = []
    first = prefill_step(prefill)
    while first is None:
        decode.step()  # nothing to run yet: it only pulls what the prefill published
        pulled_during_prefill.append(kv.num_prefetched_blocks)
        first = prefill_step(prefill)
    assert pulled_during_prefill == [4, 8, 12], "each chunk's blocks, while the prefill ran"
    assert first.kv_hashes is not None
    decode.resume("r", first.new_token_ids[0], first.kv_hashes)
    assert kv.num_loaded_blocks == 13, "only the partial last block was left at the resume"
    rest = decode_all(decode, "r")
    assert first.new_token_ids + rest == expected
    assert decode.block_manager.allocator.num_used == 0
    assert prefill.block_manager.allocator.num_used == 0
    assert store.stats().num_pinned_blocks == 0


def test_abort_during_a_pipelined_pull_frees_blocks_and_pins(model_dir: str) -> None:
    store = EmbeddedKVStore(capacity_blocks=256)
    prefill = Engine(config(model_dir), store, publish_kv=True)
    decode = Engine(config(model_dir), store)
    prompt = [(5 * i + 1) % 500 for i in range(100)]
    prefill.add_request(prompt, dataclasses.replace(PARAMS, max_tokens=1), "a")
    decode.prefetch(prompt, PARAMS, "a")
    prefill_step(prefill)
    decode.step()
    assert decode.kv is not None and decode.kv.num_prefetched_blocks == 4
    assert store.stats().num_pinned_blocks == 4
    assert decode.abort("a") and prefill.abort("a")
    assert decode.block_manager.allocator.num_used == 0
    assert prefill.block_manager.allocator.num_used == 0
    assert store.stats().num_pinned_blocks == 0
    assert not decode.prefetcher.pending  # type: ignore[union-attr]
    with pytest.raises(Exception, match="not known"):
        decode.resume("a", 1, [])


def test_resume_with_blocks_of_another_prompt_is_refused(model_dir: str) -> None:
    store = EmbeddedKVStore(capacity_blocks=64)
    decode = Engine(config(model_dir), store)
    decode.prefetch(list(range(20)), PARAMS, "x")
    with pytest.raises(Exception, match="other blocks"):
        decode.resume("x", 1, [b"\0" * 16] * 3)
    assert decode.abort("x") and decode.block_manager.allocator.num_used == 0


@pytest.mark.parametrize("async_retain", [False, True], ids=["at-once", "host-publisher"])
@pytest.mark.parametrize("num_output", [12, 13])
def test_finished_decode_leaves_prompt_and_output_blocks_as_prefix_cache(
    model_dir: str, num_output: int, async_retain: bool
) -> None:
    """20 prompt + 12 output tokens = 32: the last token fills block 4, so its KV is computed
    at the end and all 4 blocks stay; with 13 outputs the 5th block is partial: 4 stay. The
    host publisher (GPU default) writes them from its own thread: the same blocks."""
    store = EmbeddedKVStore(capacity_blocks=64)
    cache_off = {"enable_prefix_caching": False}
    prefill = Engine(config(model_dir, **cache_off), store, publish_kv=True)
    decode = Engine(config(model_dir, **cache_off, async_retain=async_retain), store)
    assert decode.kv is not None and (decode.kv.publisher is not None) == async_retain
    prompt = list(range(100, 120))
    params = dataclasses.replace(PARAMS, max_tokens=num_output)
    prefill.add_request(prompt, dataclasses.replace(params, max_tokens=1), "t1")
    first = None
    while first is None:
        first = prefill_step(prefill)
    decode.add_request(prompt, params, "t1", first.new_token_ids, first.kv_hashes)
    output = first.new_token_ids + decode_all(decode, "t1")
    if decode.kv.publisher is not None:
        decode.kv.publisher.flush()
    assert decode.kv.num_retained_blocks == 2, "blocks 3 and 4: the prompt's 2 were there"
    assert store.stats().num_pinned_blocks == 0, "kept unpinned, as an LRU prefix cache"
    conversation = prompt + output
    chain = hash_full_blocks(conversation, BLOCK, decode.block_manager.namespace)
    assert len(chain) == 4 and store.match_prefix(chain) == 4
    # The next turn's prompt starts with the whole conversation: its prefill imports it.
    next_turn = [*conversation, 7, 8, 9]
    prefill.add_request(next_turn, dataclasses.replace(params, max_tokens=1), "t2")
    reply = None
    while reply is None:
        reply = prefill_step(prefill)
    assert reply.num_cached_tokens == 32
    reference = LLM(config(model_dir, **cache_off)).generate([next_turn], params)[0]
    assert reply.new_token_ids == reference.token_ids[:1]
    store.release("t2")
    assert store.stats().num_pinned_blocks == 0


def test_a_worker_in_its_own_process_refuses_the_embedded_store(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pdmesh.cli import main

    monkeypatch.setenv("PDMESH_MESH_SECRET", "s3cret-" * 6)  # past the secret check
    assert main(["serve", "decode", "--store", "embedded", "--device", "cpu"]) == 2
    assert "needs a store shared with the others" in capsys.readouterr().err


def test_abort_with_a_token_still_on_the_device_retains_what_was_computed(model_dir: str) -> None:
    """Async scheduling: a request cut short (a stop string at the gateway) while its newest
    token is a placeholder leaves exactly its computed blocks in the store, and nothing else."""
    store = EmbeddedKVStore(capacity_blocks=64)
    cache_off = {"enable_prefix_caching": False}
    prefill = Engine(config(model_dir, **cache_off), store, publish_kv=True)
    overlapping = dataclasses.replace(config(model_dir, **cache_off), async_scheduling=True)
    decode = Engine(overlapping, store)
    prompt = list(range(100, 120))
    prefill.add_request(prompt, dataclasses.replace(PARAMS, max_tokens=1), "a1")
    first = None
    while first is None:
        first = prefill_step(prefill)
    decode.add_request(prompt, PARAMS, "a1", first.new_token_ids, first.kv_hashes)
    reported = list(first.new_token_ids)
    for _ in range(6):
        reported += [t for o in decode.step() if o.request_id == "a1" for t in o.new_token_ids]
    assert decode.requests["a1"].has_pending_token
    assert decode.abort("a1")
    assert decode.num_free_blocks == decode.runner.num_blocks
    assert store.stats().num_pinned_blocks == 0
    chain = hash_full_blocks(prompt + reported, BLOCK, decode.block_manager.namespace)
    assert len(chain) >= 3 and store.match_prefix(chain) == len(chain)
    assert decode.step() == []  # the dropped device token is never reported
