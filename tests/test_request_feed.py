"""A request's feed from its worker session: whatever arrived since the last read comes out
as one delta, and a reader that falls behind loses nothing."""

from __future__ import annotations

import asyncio
import random

from gateway.sessions import RequestFeed
from pdmesh.v1 import generation_pb2 as gen_pb
from pdmesh.v1 import worker_pb2 as worker_pb


def _event(
    token_ids: list[int], finish: int = gen_pb.FINISH_REASON_UNSPECIFIED
) -> worker_pb.RequestEvent:
    return worker_pb.RequestEvent(request_id="r", token_ids=token_ids, finish_reason=finish)


def test_a_slow_reader_gets_every_token_in_order_in_fewer_deltas() -> None:
    rng = random.Random(3)
    steps = [[rng.randrange(1000) for _ in range(rng.randrange(1, 3))] for _ in range(200)]

    async def run() -> tuple[list[int], int, int]:
        feed = RequestFeed()
        got: list[int] = []
        reads = 0

        async def worker() -> None:
            for index, tokens in enumerate(steps):
                last = index == len(steps) - 1
                feed.push(_event(tokens, gen_pb.FINISH_REASON_LENGTH if last else 0))
                await asyncio.sleep(0)

        producer = asyncio.create_task(worker())
        finish = gen_pb.FINISH_REASON_UNSPECIFIED
        while finish == gen_pb.FINISH_REASON_UNSPECIFIED:
            delta = await feed.next()
            reads += 1
            got.extend(delta.token_ids)
            finish = delta.finish_reason
            for _ in range(rng.randrange(0, 6)):  # a reader slower than its worker
                await asyncio.sleep(0)
        await producer
        return got, reads, finish

    got, reads, finish = asyncio.run(run())
    assert got == [t for tokens in steps for t in tokens]
    assert finish == gen_pb.FINISH_REASON_LENGTH
    assert reads < len(steps), "deltas were coalesced"


def test_a_failure_comes_after_the_tokens_that_arrived_before_it() -> None:
    async def run() -> tuple[list[int], str]:
        feed = RequestFeed()
        feed.push(_event([1, 2]))
        feed.push(worker_pb.RequestEvent(request_id="r", error_code=14, error_message="gone"))
        first = await feed.next()
        try:
            await feed.next()
        except Exception as error:  # the worker's failure, raised once the tokens are read
            return list(first.token_ids), str(error)
        return list(first.token_ids), ""

    tokens, error = asyncio.run(run())
    assert tokens == [1, 2]
    assert "gone" in error
