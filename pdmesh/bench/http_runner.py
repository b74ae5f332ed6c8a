"""Drives a gateway's OpenAI HTTP API (``POST /v1/completions``, streamed) with the same
workloads and load shapes as the gRPC runner, timing every streamed chunk."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

from pdmesh.bench.runner import LoadShape, _closed_loop, _open_loop, spawn_clients
from pdmesh.bench.stats import RequestResult
from pdmesh.bench.workload import BenchRequest


def to_body(request: BenchRequest, temperature: float, model: str | None) -> dict[str, Any]:
    """The gRPC runner's request as a completions body (ignore_eos: exact output lengths)."""
    body: dict[str, Any] = {
        "prompt": list(request.prompt_token_ids) or request.prompt,
        "max_tokens": request.max_tokens,
        "temperature": temperature,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model is not None:
        body["model"] = model
    return body


async def send_one(
    client: Any, request: BenchRequest, temperature: float, timeout_s: float
) -> RequestResult:
    result = RequestResult(prompt_len=request.prompt_len)
    start = last = time.perf_counter()
    num_tokens = 0
    try:
        body = to_body(request, temperature, None)
        async with client.stream("POST", "/v1/completions", json=body, timeout=timeout_s) as reply:
            if reply.status_code != 200:
                await reply.aread()
                result.error = f"HTTP {reply.status_code}: {reply.text[:200]}"
                return result
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    num_tokens = chunk["usage"]["completion_tokens"]
                    result.prompt_len = chunk["usage"]["prompt_tokens"]
                if chunk.get("choices"):  # a piece: one or more new tokens
                    now = time.perf_counter()
                    if result.ttft_s == 0.0:
                        result.ttft_s = now - start
                    else:
                        result.itls_s.append(now - last)
                    last = now
        result.output_len = num_tokens
        result.e2e_s = last - start
        result.success = num_tokens > 0
        result.error = "" if result.success else "no tokens"
    except Exception as error:  # a transport failure is a failed request, counted as such
        result.error = f"{type(error).__name__}: {error}"
    return result


async def run_load(
    base_url: str,
    requests: Sequence[BenchRequest],
    shape: LoadShape,
    temperature: float = 0.0,
    timeout_s: float = 600.0,
    api_key: str | None = None,
) -> tuple[list[RequestResult], float]:
    """Every request's result (in workload order) and the run's wall time in seconds."""
    import httpx

    results: list[RequestResult | None] = [None] * len(requests)
    concurrency = shape.concurrency or len(requests)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=base_url, limits=limits, headers=headers) as client:

        async def one(index: int) -> None:
            results[index] = await send_one(client, requests[index], temperature, timeout_s)

        start = time.perf_counter()
        if shape.arrival_offsets is not None:
            await _open_loop(one, shape.arrival_offsets, start)
        else:
            assert shape.concurrency is not None
            await _closed_loop(one, len(requests), shape.concurrency)
        duration = time.perf_counter() - start
    return [r for r in results if r is not None], duration


def run_load_processes(
    base_url: str,
    requests: Sequence[BenchRequest],
    shape: LoadShape,
    temperature: float = 0.0,
    timeout_s: float = 600.0,
    clients: int = 1,
) -> tuple[list[RequestResult], float]:
    """As ``pdmesh.bench.runner.run_load_processes``, over HTTP: ``clients`` processes with
    their share of the load each, started together; wall time from first start to last end."""
    return spawn_clients(_client, base_url, requests, shape, temperature, timeout_s, clients)


def _client(
    base_url: str,
    requests: list[BenchRequest],
    shape: LoadShape,
    temperature: float,
    timeout_s: float,
    barrier: Any,
    queue: Any,
) -> None:
    barrier.wait()
    started = time.time()
    results, _ = asyncio.run(run_load(base_url, requests, shape, temperature, timeout_s))
    queue.put((started, time.time(), results))
