"""The n choices of one OpenAI request, each a gateway request of its own, as one stream
of (choice index, piece).

Choice 0 runs first; the others start once its first token is out, when its prompt's
full blocks are in the store, so they find them there and the prompt is computed once
(only its last, partial block is recomputed per choice)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from gateway.openai_schema import OpenAIRequest, choice_message
from gateway.service import GatewayCore
from pdmesh.v1 import generation_pb2 as gen_pb

Item = tuple[int, gen_pb.GenerateResponse | BaseException | None]


async def _pump(
    core: GatewayCore,
    message: gen_pb.GenerateRequest,
    index: int,
    queue: asyncio.Queue[Item],
    started: asyncio.Event | None,
    owner: str,
) -> None:
    """Relays one choice into ``queue``; None marks its end, an exception its failure."""
    try:
        async for piece in core.generate(message, owner):
            if started is not None:
                started.set()
            queue.put_nowait((index, piece))
    except Exception as error:
        queue.put_nowait((index, error))
    finally:
        queue.put_nowait((index, None))


async def run_choices(
    core: GatewayCore, request: OpenAIRequest, request_id: str, owner: str = ""
) -> AsyncIterator[tuple[int, gen_pb.GenerateResponse]]:
    """Every choice's pieces as they come. Leaving early (a client gone, an error, a
    deadline) ends every choice, which frees its blocks and pins. ``owner``: whose id
    ``request_id`` is (see GatewayCore.generate)."""
    if request.n == 1:  # the common case: no tasks, no queue
        async for piece in core.generate(choice_message(request, request_id, 0), owner):
            yield 0, piece
        return
    queue: asyncio.Queue[Item] = asyncio.Queue()
    first_out = asyncio.Event()
    tasks = [
        asyncio.create_task(
            _pump(core, choice_message(request, request_id, 0), 0, queue, first_out, owner)
        )
    ]

    async def start_the_rest() -> None:
        await first_out.wait()
        for index in range(1, request.n):
            message = choice_message(request, request_id, index)
            tasks.append(asyncio.create_task(_pump(core, message, index, queue, None, owner)))

    launcher = asyncio.create_task(start_the_rest())
    try:
        remaining = request.n
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        launcher.cancel()
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(launcher, *tasks, return_exceptions=True)
