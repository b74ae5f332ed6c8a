"""The device lane on the CPU (the arena is host memory here; CUDA IPC is in
tests/test_gpu_lane.py): the index's epochs and ring reuse with exact values, and hand-offs
between two real engines (a tiny Llama) through the lane of an embedded and of a Redis
store, token-identical to one engine, whether blocks come from the lane, from rows demoted
to the store, or from the store after a row moved on during the copy."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import pytest

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine import Engine, StepOutput
from engine.lane_transfer import LaneTransfer
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from kvstore.base import KVStore
from kvstore.block_hash import HASH_BYTES, BlockHash
from kvstore.device_lane import DeviceArena, LaneIndex, LaneSlot, MemoryLaneIndex
from tests.tiny_models import save_tiny_model

BLOCK = 8
CHUNK = 32
PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPT = [(7 * i + 3) % 500 for i in range(100)]  # 4 chunks: 12 full blocks + a partial one


@pytest.fixture(params=("embedded", "redis+shm"))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_model("llama3", tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def expected(model_dir: str) -> list[int]:
    return LLM(config(model_dir, lane_mib=None)).generate([PROMPT], PARAMS)[0].token_ids


def config(model_dir: str, lane_mib: int | None = 1) -> EngineConfig:
    return EngineConfig(
        model=model_dir,
        device="cpu",
        cache=CacheConfig(block_size=BLOCK, handoff_lane_mib=lane_mib),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=CHUNK),
    )


def h(i: int) -> BlockHash:
    return BlockHash(i.to_bytes(HASH_BYTES, "big"))


def lane_index(store: KVStore) -> LaneIndex:
    index = store.device_lane()
    assert index is not None
    return index


def test_slots_name_one_write_of_a_row_and_forget_keeps_newer_ones(
    make_store: Callable[[int], KVStore],
) -> None:
    index = lane_index(make_store(16))
    arena = DeviceArena(block_bytes=8, num_rows=4, device="cpu")
    index.register(arena)
    aid = arena.arena_id
    assert arena.next_rows(3) == [0, 1, 2]
    slots = arena.fill([0, 1, 2], [h(0), h(1), h(2)])
    assert slots == [LaneSlot(aid, 0, 1), LaneSlot(aid, 1, 1), LaneSlot(aid, 2, 1)]
    index.publish(list(zip([h(0), h(1), h(2)], slots, strict=True)))
    assert index.lookup([h(0), h(1), h(2), h(9)]) == [*slots, None]
    stale = LaneSlot(aid, 1, 9)
    assert index.confirm([(h(0), slots[0]), (h(1), stale)]) == [True, False]
    assert arena.next_rows(3) == [3, 0, 1], "the ring wraps"
    old = arena.contents([3, 0, 1])
    assert old == [(h(0), slots[0]), (h(1), slots[1])], "row 3 was never written"
    assert index.forget_taken(old) == [True, False], "only the confirmed copy was taken"
    assert index.lookup([h(0), h(1)]) == [None, slots[1]], "an untaken block keeps its name"
    elsewhere = LaneSlot("another-arena", 0, 5)
    index.publish([(h(1), elsewhere)])  # a newer copy of block 1
    index.forget(old[1:])
    assert index.lookup([h(0), h(1), h(2)]) == [None, elsewhere, slots[2]]
    assert index.forget_taken([(h(0), slots[0])]) == [False], "forgotten, not taken any more"
    again = arena.fill([3, 0, 1], [h(3), h(4), h(5)])
    assert again == [LaneSlot(aid, 3, 2), LaneSlot(aid, 0, 2), LaneSlot(aid, 1, 2)]
    assert index.arena_rows(aid) is arena.rows, "one process: the tensor itself"
    with pytest.raises(ValueError, match=r"1\.\.4 rows"):
        arena.next_rows(5)
    index.unregister(aid)
    arena.close()
    assert index.arena_rows(aid) is None


def prefill_until_first_token(engine: Engine, between: Callable[[], object]) -> StepOutput:
    while True:
        for output in engine.step():
            if output.finish_reason is not None:
                return output
        between()


def decode_all(engine: Engine) -> list[int]:
    tokens: list[int] = []
    while engine.has_unfinished:
        for output in engine.step():
            tokens += output.new_token_ids
    return tokens


def hand_off(prefill: Engine, decode: Engine, request_id: str, pull: bool) -> list[int]:
    """One request prefilled by ``prefill`` and decoded by ``decode``, which pulls while
    the prefill runs when ``pull``."""
    prefill.add_request(PROMPT, dataclasses.replace(PARAMS, max_tokens=1), request_id)
    decode.prefetch(PROMPT, PARAMS, request_id)
    first = prefill_until_first_token(prefill, decode.step if pull else lambda: None)
    assert first.kv_hashes is not None
    decode.resume(request_id, first.new_token_ids[0], first.kv_hashes)
    return first.new_token_ids + decode_all(decode)


def engines(model_dir: str, store: KVStore) -> tuple[Engine, Engine]:
    return Engine(config(model_dir), store, publish_kv=True), Engine(config(model_dir), store)


def test_hand_off_through_the_lane_skips_the_store(
    model_dir: str, expected: list[int], make_store: Callable[[int], KVStore]
) -> None:
    store = make_store(256)
    prefill = Engine(config(model_dir), store, publish_kv=True)
    decode = Engine(config(model_dir, lane_mib=0), store)  # reads whatever its own size
    assert prefill.kv is not None and decode.kv is not None
    lane, reader = prefill.kv.lane, decode.kv.lane
    assert lane is not None and lane.arena is not None and reader is not None
    assert reader.arena is None, "only a worker that publishes has an arena"
    assert hand_off(prefill, decode, "r", pull=True) == expected
    assert reader.num_filled_blocks == 13, "every block, the partial one too, by the lane"
    assert decode.kv.num_prefetched_blocks == 12, "the full ones while the prefill ran"
    assert lane.num_demoted_blocks == 0
    metrics = store.metrics()
    assert (
        metrics.bytes_moved.get("shm_write", 0) + metrics.bytes_moved.get("embedded_write", 0)
        == store.stats().num_blocks * prefill.runner.bytes_per_stored_block
    ), "the store got only what the decode worker kept of the finished request"
    assert store.stats().num_pinned_blocks == 0
    assert prefill.block_manager.allocator.num_used == 0
    assert decode.block_manager.allocator.num_used == 0


def small_lane(engine: Engine, store: KVStore, num_rows: int) -> LaneTransfer:
    assert engine.kv is not None and engine.kv.lane is not None
    engine.kv.lane.close()
    engine.kv.lane = LaneTransfer(lane_index(store), engine.runner, store, num_rows)
    return engine.kv.lane


def test_rows_reused_before_the_decode_took_them_are_demoted_to_the_store(
    model_dir: str, expected: list[int], make_store: Callable[[int], KVStore]
) -> None:
    store = make_store(256)
    prefill, decode = engines(model_dir, store)
    lane = small_lane(prefill, store, num_rows=8)
    # No pulls during the prefill: chunks 1 and 2 fill the 8 rows, chunk 3 reuses chunk 1's
    # rows and the partial last block one of chunk 2's, untaken, so 5 blocks go down first.
    assert hand_off(prefill, decode, "r", pull=False) == expected
    assert lane.num_demoted_blocks == 5
    assert decode.kv is not None and decode.kv.lane is not None
    assert decode.kv.lane.num_filled_blocks == 8, "the rest came from the store"
    # Again, with the rows of the first hand-off reused (its decode took some, not others).
    assert hand_off(prefill, decode, "r2", pull=True) == expected
    assert store.stats().num_pinned_blocks == 0


class RowsMoveOnDuringCopy(MemoryLaneIndex):
    """A lane index whose writer publishes again between a reader's copy and its
    confirmation (what the sequence lock is for: a rewritten row, or a block republished
    elsewhere, fails the confirmation)."""

    def __init__(self) -> None:
        super().__init__()
        self.during_copy: Callable[[], object] | None = None

    def confirm(self, blocks: Sequence[tuple[BlockHash, LaneSlot]]) -> list[bool]:
        if self.during_copy is not None:
            action, self.during_copy = self.during_copy, None
            action()
        return super().confirm(blocks)


def resume_while_prefilling(
    model_dir: str, num_rows: int, during_copy: list[int]
) -> tuple[KVStore, LaneTransfer, Engine, list[int]]:
    """PROMPT prefilled into a lane of ``num_rows``; then the decode engine resumes it while
    the prefill engine prefills ``during_copy`` (between the copy and its confirmation).
    Returns the store, the prefill's lane, the decode engine and the first token."""
    from kvstore.embedded import EmbeddedKVStore

    store = EmbeddedKVStore(256)
    index = RowsMoveOnDuringCopy()
    store._lane = index  # this store's lane is the racing one
    prefill, decode = engines(model_dir, store)
    lane = small_lane(prefill, store, num_rows)
    one_token = dataclasses.replace(PARAMS, max_tokens=1)
    prefill.add_request(PROMPT, one_token, "r")
    decode.prefetch(PROMPT, PARAMS, "r")
    first = prefill_until_first_token(prefill, lambda: None)
    assert first.kv_hashes is not None
    index.during_copy = lambda: (
        prefill.add_request(during_copy, one_token, "during-copy"),
        prefill_until_first_token(prefill, lambda: None),
    )
    decode.resume("r", first.new_token_ids[0], first.kv_hashes)
    return store, lane, decode, first.new_token_ids


def test_blocks_whose_rows_moved_on_during_the_copy_come_from_the_store(
    model_dir: str, expected: list[int]
) -> None:
    # The resume copies all 13 blocks; meanwhile another prompt takes 4 of their rows.
    other = [(11 * i + 5) % 500 for i in range(32)]
    store, lane, decode, first = resume_while_prefilling(model_dir, 13, during_copy=other)
    assert decode.kv is not None and decode.kv.lane is not None
    assert decode.kv.lane.num_filled_blocks == 9, "4 rows moved on during the copy"
    assert lane.num_demoted_blocks == 4, "the writer saved them first: nobody had taken them"
    assert first + decode_all(decode) == expected
    assert store.stats().num_pinned_blocks == 0


def test_stores_that_serve_other_hosts_have_no_lane(redis_url: str, namespace: str) -> None:
    from kvstore.factory import open_store

    store = open_store(f"redis://{redis_url.partition('://')[2]}", 16, namespace=namespace)
    try:
        assert store.device_lane() is None, "a reader on another host could not map an arena"
    finally:
        store.close()


def test_an_arena_the_decode_process_cannot_map_leaves_it_to_recompute(
    model_dir: str, expected: list[int], redis_url: str, namespace: str
) -> None:
    from kvstore.device_lane import _LOCAL_ARENAS
    from kvstore.factory import open_store

    store = open_store(f"redis+shm://{redis_url.partition('://')[2]}", 256, namespace=namespace)
    try:
        prefill, decode = engines(model_dir, store)
        assert prefill.kv is not None and prefill.kv.lane is not None
        arena = prefill.kv.lane.arena
        assert arena is not None
        # As a process that cannot map it sees it (a CPU arena of another process).
        _LOCAL_ARENAS.pop(arena.arena_id)
        assert hand_off(prefill, decode, "r", pull=True) == expected
        assert decode.kv is not None and decode.kv.lane is not None
        assert decode.kv.lane.num_filled_blocks == 0
        assert decode.kv.num_prefetched_blocks == 0, "no slot of it counted as pullable"
        assert store.stats().num_pinned_blocks == 0
    finally:
        store.close()


def test_a_block_republished_during_the_copy_is_copied_again_from_its_new_slot(
    model_dir: str, expected: list[int]
) -> None:
    # The same prompt again: the prefill's own prefix cache holds it, and it publishes all
    # 13 blocks again, into new rows, while the decode worker copies the first ones.
    store, lane, decode, first = resume_while_prefilling(model_dir, 32, during_copy=PROMPT)
    assert decode.kv is not None and decode.kv.lane is not None
    assert lane.arena is not None and sum(h is not None for h in lane.arena.held) == 26
    assert decode.kv.lane.num_filled_blocks == 13, "copied again from the new slots"
    assert lane.num_demoted_blocks == 0 and store.stats().num_blocks == 0, "no store needed"
    assert first + decode_all(decode) == expected


def test_closing_a_lane_demotes_what_no_reader_took(
    model_dir: str, expected: list[int], make_store: Callable[[int], KVStore]
) -> None:
    store = make_store(256)
    prefill, decode = engines(model_dir, store)
    prefill.add_request(PROMPT, dataclasses.replace(PARAMS, max_tokens=1), "r")
    first = prefill_until_first_token(prefill, lambda: None)
    assert first.kv_hashes is not None
    assert prefill.kv is not None and prefill.kv.lane is not None
    prefill.kv.lane.close()  # a prefill worker draining before the decode worker resumed
    assert prefill.kv.lane.num_demoted_blocks == 13
    assert store.match_prefix(first.kv_hashes) == 13
    decode.prefetch(PROMPT, PARAMS, "r")
    decode.resume("r", first.new_token_ids[0], first.kv_hashes)
    assert decode.kv is not None and decode.kv.lane is not None
    assert decode.kv.lane.num_filled_blocks == 0, "the arena is gone: all from the store"
    assert first.new_token_ids + decode_all(decode) == expected
    assert store.stats().num_pinned_blocks == 0
