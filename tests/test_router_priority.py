"""Routing by priority (#23), on exact loads: under the priority policy a worker counts only
the requests a new one does not outrank, and their blocks as room; under fcfs everything in
flight counts, as before."""

from __future__ import annotations

import pytest

from gateway.router import Router, Worker
from pdmesh.v1 import worker_pb2 as worker_pb


def worker(name: str, role: str, policy: str, free: int = 0, used: int = 0) -> Worker:
    made = Worker(name, role, channel=None, stub=None)  # type: ignore[arg-type]
    load = worker_pb.LoadReport(num_free_blocks=free, num_used_blocks=used)
    load.scheduling_policy = policy
    made.load_answered(load)
    return made


@pytest.mark.parametrize("policy", ["priority", "fcfs"])
def test_a_prompt_goes_where_nothing_as_urgent_is_ahead(policy: str) -> None:
    router = Router([], [], max_imbalance_tokens=100)
    busy, light = worker("busy", "prefill", policy), worker("light", "prefill", policy)
    router.prefill = [busy, light]
    busy.hold(5, 3, 3000)  # three long prompts of priority 5
    light.hold(0, 1, 500)  # one urgent prompt
    assert (busy.in_flight, busy.outstanding_tokens) == (3, 3000)
    urgent = router.pick_prompt_worker([], priority=0)[0]
    # priority: nothing of priority <= 0 is ahead on `busy` (its prompts wait for this one);
    # fcfs: the worker serves in arrival order, so 500 tokens beat 3000.
    assert urgent is (busy if policy == "priority" else light)
    assert busy.ahead(0) == ((0, 0) if policy == "priority" else (3, 3000))
    assert router.pick_prompt_worker([], priority=5)[0] is light  # 500 ahead against 3000
    busy.hold(5, -3, -3000)
    assert busy.ahead(5) == (0, 0) and busy.in_flight == 0


@pytest.mark.parametrize("policy", ["priority", "fcfs"])
def test_a_decode_counts_the_blocks_of_requests_it_outranks_as_room(policy: str) -> None:
    router = Router([], [])
    full = worker("full", "decode", policy, free=10, used=90)
    roomy = worker("roomy", "decode", policy, free=40, used=60)
    router.decode = [full, roomy]
    full.hold(5, 3)
    roomy.hold(0, 1)
    # priority 0 on `full`: 10 free + the 90 blocks of the three it preempts; on `roomy`:
    # 40 free less the one urgent request ahead. fcfs: 10 - 3 against 40 - 1.
    assert full.decode_room(0) == (100 if policy == "priority" else 7)
    assert roomy.decode_room(0) == 39
    assert router.pick_decode(0) is (full if policy == "priority" else roomy)
    assert full.decode_room(5) == 7 and router.pick_decode(5) is roomy


def test_the_mesh_serves_by_priority_only_when_a_routable_worker_does() -> None:
    router = Router([], [])
    fcfs, by_priority = worker("a", "decode", "fcfs"), worker("b", "decode", "priority")
    router.decode = [fcfs]
    assert not router.serves_by_priority()
    router.decode = [fcfs, by_priority]
    assert router.serves_by_priority()
    by_priority.healthy = False
    assert not router.serves_by_priority()
