"""Preempted requests swapped to host blocks and back: exact swap-out and swap-in copies,
block ids on both sides, and a resume that computes only what was never computed. Pure
Python, no model (the ``Driver`` of the fcfs plans with a host block pool)."""

from __future__ import annotations

import torch

from engine.sequence import SequenceStatus
from engine.swap import HostKVCache, SwapCost
from tests.test_scheduler_plans import Driver, tokens


def test_the_newest_is_swapped_out_and_resumes_by_copy() -> None:
    sim = Driver(budget=32, max_num_seqs=4, num_blocks=6, block_size=4, swap_blocks=3)
    host = sim.scheduler.swap
    assert host is not None
    a, b, c = (sim.add(name, tokens(100 * i, 8), max_tokens=4) for i, name in enumerate("ABC"))
    assert sim.step() == [("A", 0, 8), ("B", 0, 8), ("C", 0, 8)]
    assert c.block_table == [4, 5]
    d = sim.add("D", tokens(900, 3), max_tokens=2)
    # C, the newest, is preempted to host blocks 0 and 1; its device blocks go to A and B.
    assert sim.step() == [("A", 8, 9), ("B", 8, 9)]
    assert sim.last is not None and sim.last.swap_out == [(4, 0), (5, 1)]
    assert sim.last.swap_in == [] and sim.last.preempted == [c]
    assert (a.block_table, b.block_table, c.block_table) == ([0, 1, 5], [2, 3, 4], [])
    assert c.host_block_table == [0, 1] and c.num_swapped_tokens == 8
    assert c.status is SequenceStatus.WAITING and c.num_computed_tokens == 0
    assert list(host.allocator.free_queue) == [2]
    assert sim.step() == [("A", 9, 10), ("B", 9, 10)]
    assert sim.step() == [("A", 10, 11), ("B", 10, 11)]  # both finish
    # C is copied back into blocks 5 and 1 and computes only its first output token (the
    # recomputing scheduler reruns all 9 tokens, ("C", 0, 9)).
    assert sim.step() == [("C", 8, 9), ("D", 0, 3)]
    assert sim.last.swap_in == [(5, 0), (1, 1)] and sim.last.swap_out == []
    assert c.block_table == [5, 1, 0] and d.block_table == [4]
    assert c.host_block_table == [] and list(host.allocator.free_queue) == [2, 0, 1]
    while sim.scheduler.has_unfinished:
        sim.step()
    assert len(c.output_token_ids) == 4 and c.num_preemptions == 1
    sim.assert_all_free()
    assert host.allocator.num_free == 3


def test_a_victim_the_host_pool_cannot_hold_is_recomputed() -> None:
    sim = Driver(budget=32, max_num_seqs=4, num_blocks=6, block_size=4, swap_blocks=1)
    for i, name in enumerate("ABC"):
        sim.add(name, tokens(100 * i, 8), max_tokens=4)
    sim.step()
    c = sim.scheduler.running[2]
    assert sim.step() == [("A", 8, 9), ("B", 8, 9)]
    assert sim.last is not None and sim.last.swap_out == [] and c.host_block_table == []
    while sim.scheduler.has_unfinished:
        sim.step()
    sim.assert_all_free()


def test_aborting_a_swapped_request_frees_its_host_blocks() -> None:
    sim = Driver(budget=32, max_num_seqs=4, num_blocks=6, block_size=4, swap_blocks=4)
    for i, name in enumerate("ABC"):
        sim.add(name, tokens(100 * i, 8), max_tokens=4)
    sim.step()
    c = sim.scheduler.running[2]
    sim.step()
    assert c.host_block_table == [0, 1]
    from engine.sequence import FinishReason

    sim.scheduler.finish(c, FinishReason.ABORT)
    swap = sim.scheduler.swap
    assert swap is not None and swap.allocator.num_free == 4 and c.host_block_table == []


def test_host_cache_copies_exact_blocks_both_ways() -> None:
    device = torch.arange(2 * 2 * 6 * 4 * 1 * 2, dtype=torch.float32).reshape(2, 2, 6, 4, 1, 2)
    original = device.clone()
    host = HostKVCache(device, num_blocks=3)
    host.swap_out([(4, 0), (5, 2)])
    assert torch.equal(host.cache[:, :, 0], original[:, :, 4])
    assert torch.equal(host.cache[:, :, 2], original[:, :, 5])
    device[:, :, 4:6] = -1  # the device blocks are reused by someone else
    host.swap_in([(1, 2), (3, 0)])
    assert torch.equal(device[:, :, 1], original[:, :, 5])
    assert torch.equal(device[:, :, 3], original[:, :, 4])
    assert host.measure_bytes_per_s() > 0


def test_swap_is_chosen_when_copying_costs_less_than_recomputing() -> None:
    cost = SwapCost(bytes_per_block=1 << 20, bytes_per_s=1e9, block_size=16)
    sim = Driver(budget=32, max_num_seqs=4, num_blocks=64, block_size=16)
    seq = sim.add("A", tokens(0, 64), max_tokens=2)
    seq.num_computed_tokens = 64  # 4 blocks: 8 MiB out and back, 8.4 ms at 1 GB/s
    assert cost.should_swap(seq)  # nothing measured yet: copying is assumed cheaper
    cost.observe_prefill(64_000, 1.0)  # 64 tokens recompute in 1 ms
    assert not cost.should_swap(seq)
    cost.observe_prefill(100, 1.0)  # the average falls to ~51 k tokens/s: 1.25 ms, still less
    assert not cost.should_swap(seq)
    slow = SwapCost(bytes_per_block=1 << 20, bytes_per_s=1e9, block_size=16)
    slow.observe_prefill(1000, 1.0)  # 64 ms to recompute
    assert slow.should_swap(seq)
