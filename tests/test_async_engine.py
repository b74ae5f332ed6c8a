"""The engine thread seen from asyncio: aborts end the caller's stream, duplicate ids are
refused without disturbing the running request."""

from __future__ import annotations

import asyncio

import pytest

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.engine import Engine, StepOutput
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason
from tests.tiny_models import save_tiny_model

LONG = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def async_engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncEngine:
    directory = save_tiny_model("llama3", tmp_path_factory.mktemp("async"))
    return AsyncEngine(Engine(EngineConfig(model=str(directory), device="cpu")))


async def collect(stream: object, limit: int | None = None) -> list[StepOutput]:
    outputs = []
    async for output in stream:  # type: ignore[attr-defined]
        outputs.append(output)
        if limit is not None and len(outputs) == limit:
            break
    return outputs


def test_abort_ends_the_stream_with_abort(async_engine: AsyncEngine) -> None:
    async def scenario() -> list[StepOutput]:
        stream = async_engine.generate([1, 2, 3], LONG, "a")
        first = await stream.__anext__()
        async_engine.abort("a")
        return [first, *await collect(stream)]

    outputs = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    assert outputs[-1].finish_reason is FinishReason.ABORT
    assert len(outputs) < 200
    assert async_engine.engine.block_manager.allocator.num_used == 0


def test_duplicate_request_id_is_refused_and_the_first_runs_on(
    async_engine: AsyncEngine,
) -> None:
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)

    async def scenario() -> list[StepOutput]:
        first = async_engine.generate([4, 5, 6], params, "dup")
        head = await first.__anext__()
        with pytest.raises(InvalidRequestError, match="already running"):
            await collect(async_engine.generate([7, 8], params, "dup"))
        return [head, *await collect(first)]

    outputs = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    assert sum(len(o.new_token_ids) for o in outputs) == 5
    assert outputs[-1].finish_reason is FinishReason.LENGTH
