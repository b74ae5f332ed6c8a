"""Allocator and block tables, asserted on exact block ids."""

from __future__ import annotations

import pytest

from engine.block_manager import BlockAllocator, BlockManager, NoFreeBlocksError
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from kvstore.block_hash import block_hash, hash_full_blocks


def seq(tokens: list[int], request_id: str = "r") -> Sequence:
    return Sequence(request_id, tokens, SamplingParams(), frozenset())


def test_allocate_in_order_and_reuse_least_recently_freed() -> None:
    alloc = BlockAllocator(4)
    assert [alloc.allocate() for _ in range(3)] == [0, 1, 2]
    alloc.free(1)
    alloc.free(0)
    assert alloc.num_free == 3
    # never-used block 3 was queued first, then 1, then 0
    assert [alloc.allocate() for _ in range(3)] == [3, 1, 0]
    with pytest.raises(NoFreeBlocksError):
        alloc.allocate()


def test_share_counts_references() -> None:
    alloc = BlockAllocator(2)
    block = alloc.allocate()
    alloc.share(block)  # a forked sequence holds it too
    alloc.free(block)
    assert alloc.num_free == 1 and alloc.ref_counts[block] == 1
    alloc.free(block)
    assert alloc.num_free == 2 and alloc.ref_counts[block] == 0
    with pytest.raises(ValueError, match="already free"):
        alloc.free(block)


def test_freed_cached_block_is_revived_then_evicted_in_order() -> None:
    alloc = BlockAllocator(3)
    a, b = alloc.allocate(), alloc.allocate()
    alloc.register(a, b"A" * 16)
    alloc.register(b, b"B" * 16)
    alloc.free(a)
    alloc.free(b)
    assert alloc.lookup(b"A" * 16) == a
    alloc.share(a)  # revived from the free queue by a prefix hit
    assert alloc.num_free == 2 and alloc.ref_counts[a] == 1
    assert alloc.allocate() == 2  # never-used block first
    assert alloc.allocate() == b  # then the cached block b, whose hash is forgotten
    assert alloc.lookup(b"B" * 16) is None and alloc.lookup(b"A" * 16) == a


def test_hash_chain_depends_on_prefix_and_namespace() -> None:
    tokens = list(range(40))
    hashes = hash_full_blocks(tokens, 16, b"m")
    assert len(hashes) == 2
    assert hashes[1] == block_hash(hashes[0], tokens[16:32], b"m")
    other_prefix = hash_full_blocks([99, *tokens[1:]], 16, b"m")
    assert other_prefix[1] != hashes[1]
    assert hash_full_blocks(tokens, 16, b"other")[0] != hashes[0]
    assert hash_full_blocks(tokens, 16, b"m", known=hashes[:1]) == hashes


def test_block_tables_prefix_hits_and_free() -> None:
    manager = BlockManager(8, 4, b"ns", enable_prefix_caching=True)
    first = seq(list(range(10)), "a")
    manager.allocate(first, 10, manager.match_prefix(first))
    assert first.block_table == [0, 1, 2]
    first.num_computed_tokens = 10
    manager.commit_computed(first)  # blocks 0 and 1 are full and named
    second = seq([*range(8), 50, 51, 52], "b")
    hits = manager.match_prefix(second)
    assert hits == [0, 1]
    manager.allocate(second, 3, hits)
    assert second.block_table == [0, 1, 3] and second.num_computed_tokens == 8
    assert manager.allocator.ref_counts[:4] == [2, 2, 1, 1]
    manager.free(first)
    manager.free(second)
    assert manager.num_free_blocks == 8 and second.block_table == []


def test_whole_prompt_hit_leaves_last_block_to_compute() -> None:
    manager = BlockManager(8, 4, b"ns", enable_prefix_caching=True)
    first = seq(list(range(8)))
    manager.allocate(first, 8, [])
    first.num_computed_tokens = 8
    manager.commit_computed(first)
    again = seq(list(range(8)), "again")
    assert manager.match_prefix(again) == [0]


def test_can_allocate_counts_revived_blocks() -> None:
    manager = BlockManager(2, 4, b"ns", enable_prefix_caching=True)
    first = seq(list(range(5)))
    manager.allocate(first, 5, [])
    first.num_computed_tokens = 5
    manager.commit_computed(first)
    manager.free(first)
    again = seq(list(range(5)), "again")
    hits = manager.match_prefix(again)
    assert hits == [0]
    # block 0 comes back from the free queue, block 1 is needed for the 5th token
    assert manager.num_new_blocks(again, 1, hits) == 2
    assert manager.can_allocate(again, 1, hits)
