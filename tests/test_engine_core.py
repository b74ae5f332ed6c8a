"""The engine core as its own process, seen from the service that drives it: aborts end the
caller's stream, duplicate ids and a full queue are refused without disturbing running
requests, and a killed core ends its requests with UNAVAILABLE and leaves service."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

import grpc
import pytest

from engine.config import EngineConfig, SchedulerConfig
from engine.core.client import EngineCoreClient
from engine.core.messages import RequestOutput
from engine.errors import InvalidRequestError, OverloadedError, WorkerLostError
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason
from serving.rpc import status_for
from tests.tiny_models import save_tiny_model

T = TypeVar("T")
LONG = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)


class CoreThread:
    """One engine core process driven from an event loop on a thread of its own."""

    def __init__(self, config: EngineConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.lost = threading.Event()
        self.core = EngineCoreClient(config, "colocated", max_waiting=1, on_lost=self.lost.set)
        self.run(self.core.start())

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.run(self.core.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_model("llama3", tmp_path_factory.mktemp("core")))


@pytest.fixture(scope="module")
def core(model_dir: str) -> Iterator[CoreThread]:
    """One request runs at a time and one more may wait."""
    config = EngineConfig(model=model_dir, device="cpu", scheduler=SchedulerConfig(max_num_seqs=1))
    thread = CoreThread(config)
    yield thread
    thread.close()


async def collect(stream: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
    return [output async for output in stream]


async def wait_until(condition: Any, timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def test_greedy_tokens_equal_the_in_process_engine(core: CoreThread, model_dir: str) -> None:
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    reference = LLM(EngineConfig(model=model_dir, device="cpu")).generate([[5, 6, 7]], params)
    outputs = core.run(collect(core.core.generate([5, 6, 7], params, "same")))
    assert [t for o in outputs for t in o.new_token_ids] == reference[0].token_ids
    assert outputs[-1].finish_reason is FinishReason.LENGTH


def test_abort_ends_the_stream_with_abort(core: CoreThread) -> None:
    async def scenario() -> list[RequestOutput]:
        stream = core.core.generate([1, 2, 3], LONG, "a")
        first = await stream.__anext__()
        core.core.abort("a")
        return [first, *await collect(stream)]

    outputs = core.run(scenario())
    assert outputs[-1].finish_reason is FinishReason.ABORT
    assert sum(len(o.new_token_ids) for o in outputs) < LONG.max_tokens
    core.run(wait_until(lambda: core.core.load().num_used_blocks == 0))


def test_duplicate_request_id_is_refused_and_the_first_runs_on(core: CoreThread) -> None:
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)

    async def scenario() -> list[RequestOutput]:
        first = core.core.generate([4, 5, 6], params, "dup")
        head = await first.__anext__()
        with pytest.raises(InvalidRequestError, match="already running"):
            await collect(core.core.generate([7, 8], params, "dup"))
        return [head, *await collect(first)]

    outputs = core.run(scenario())
    assert sum(len(o.new_token_ids) for o in outputs) == 5
    assert outputs[-1].finish_reason is FinishReason.LENGTH


def test_refuses_past_max_waiting(core: CoreThread) -> None:
    async def scenario() -> BaseException | None:
        running = core.core.generate([1, 2, 3], LONG, "running")
        await running.__anext__()
        waiting = asyncio.ensure_future(core.core.generate([4, 5, 6], LONG, "waiting").__anext__())
        await wait_until(lambda: core.core.load().num_waiting >= 1)
        refused: BaseException | None = None
        try:
            await core.core.generate([7, 8], LONG, "refused").__anext__()
        except OverloadedError as error:
            refused = error
        waiting.cancel()
        await running.aclose()
        return refused

    refused = core.run(scenario())
    assert refused is not None
    code, message = status_for(refused)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_waiting" in message
    core.run(wait_until(lambda: core.core.load().num_used_blocks == 0))


def test_a_killed_core_fails_its_requests_and_leaves_service(model_dir: str) -> None:
    thread = CoreThread(EngineConfig(model=model_dir, device="cpu"))
    try:

        async def scenario() -> BaseException | None:
            stream = thread.core.generate([1, 2, 3], LONG, "doomed")
            await stream.__anext__()
            assert thread.core.pid is not None
            os.kill(thread.core.pid, signal.SIGKILL)
            try:
                await collect(stream)
            except WorkerLostError as error:
                return error
            return None

        lost = thread.run(scenario())
        assert lost is not None and status_for(lost)[0] == grpc.StatusCode.UNAVAILABLE
        assert thread.lost.wait(10) and not thread.core.healthy
        with pytest.raises(WorkerLostError, match="out of service"):
            thread.run(collect(thread.core.generate([1], LONG, "after")))
    finally:
        thread.close()
