"""Issue 15: worker Load polls run where a busy gateway cannot starve them. The poller has
its own thread and event loop; while the gateway's loop is held (here: blocked outright, the
extreme of busy), polls of the mesh's real workers go on and answer in time, and their
answers reach the router's state once the loop runs again."""

from __future__ import annotations

import asyncio
import functools
import time

from gateway.load_poller import LoadPoller, PollResult
from gateway.router import CHANNEL_OPTIONS, STUBS
from pdmesh.v1 import worker_pb2 as worker_pb
from serving.auth import worker_channel
from tests.mesh.harness import MeshThread

PERIOD_S = 0.2
BLOCKED_S = 2.0


def test_polls_go_on_while_the_gateway_loop_is_blocked(shared_mesh: MeshThread) -> None:
    mesh = shared_mesh.mesh
    targets = [(w.address, w.address, STUBS[w.role]) for w in mesh.workers]
    open_channel = functools.partial(worker_channel, security=mesh.security)
    answered: list[tuple[float, PollResult]] = []

    def deliver(key: str, result: PollResult) -> None:
        answered.append((time.monotonic(), result))

    async def scenario() -> tuple[float, int]:
        poller = LoadPoller(
            targets,
            lambda address: open_channel(address, CHANNEL_OPTIONS),
            deliver,
            PERIOD_S,
            timeout_s=1.0,
        )
        poller.start()
        blocked_at = time.monotonic()
        time.sleep(BLOCKED_S)  # this loop (the gateway's, in production) does nothing
        rounds = poller.rounds
        await asyncio.sleep(PERIOD_S)  # and runs again: the handed-over answers land
        await poller.stop()
        return blocked_at, rounds

    blocked_at, rounds = asyncio.run(scenario())
    # A round every 0.2 s for 2 s, while this loop could not have sent one.
    assert rounds >= 4
    assert len(answered) >= rounds * len(targets)
    assert all(isinstance(r, worker_pb.LoadReport) for _, r in answered)
    assert all(t >= blocked_at + BLOCKED_S for t, _ in answered)  # delivered on the home loop
