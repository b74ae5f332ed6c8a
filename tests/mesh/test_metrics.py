"""Every service's /metrics endpoint, scraped over real HTTP, counts a known workload exactly;
request ids given by a client are followed through the gateway, prefill and decode logs."""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.config import EngineConfig
from pdmesh.cli import main
from pdmesh.mesh import MeshConfig
from pdmesh.v1 import generation_pb2 as gen_pb
from serving.request_log import JsonFormatter, RequestIdFilter
from tests.mesh.harness import MeshThread, generate

NUM_REQUESTS = 10
PROMPT_LEN = 20  # one full 16-token block and a partial one: 2 stored blocks per request
NEW_TOKENS = 4

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after[key] - before.get(key, 0.0)


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshThread]:
    harness = MeshThread(
        MeshConfig(engine=EngineConfig(device="cpu"), gateway_port=0, metrics_port=0)
    )
    yield harness
    harness.close()


def prompt_ids(index: int) -> list[int]:
    """Distinct prompts, so no block is shared between requests."""
    return [1000 + 97 * index + position for position in range(PROMPT_LEN)]


def test_each_service_counts_a_known_workload_exactly(mesh: MeshThread) -> None:
    ports = mesh.mesh.metrics_ports
    assert set(ports) == {"gateway", "prefill-0", "decode-0"}
    before = {name: scrape(port) for name, port in ports.items()}
    for index in range(NUM_REQUESTS):
        reply = generate(
            mesh.stub,
            gen_pb.GenerateRequest(
                prompt_token_ids=prompt_ids(index),
                max_tokens=NEW_TOKENS,
                temperature=0,
                ignore_eos=True,
            ),
        )
        assert reply.usage.completion_tokens == NEW_TOKENS
    mesh.wait_idle()
    after = {name: scrape(port) for name, port in ports.items()}
    gateway, prefill, decode = (
        (after[name], before[name]) for name in ("gateway", "prefill-0", "decode-0")
    )

    assert delta(*gateway, "pdmesh_requests_total", status="length") == NUM_REQUESTS
    assert delta(*gateway, "pdmesh_requests_total", status="error") == 0
    assert delta(*gateway, "pdmesh_rpc_requests_total", method="Generate", code="OK") == 10
    assert delta(*gateway, "pdmesh_time_to_first_token_seconds_count") == NUM_REQUESTS
    assert delta(*gateway, "pdmesh_time_per_output_token_seconds_count") == NUM_REQUESTS
    assert delta(*gateway, "pdmesh_e2e_request_latency_seconds_count") == NUM_REQUESTS
    assert delta(*gateway, "pdmesh_generation_tokens_total") == NUM_REQUESTS * NEW_TOKENS
    assert delta(*gateway, "pdmesh_prompt_tokens_total") == NUM_REQUESTS * PROMPT_LEN
    # The gateway looks up each prompt's one full block for routing: never stored before.
    assert delta(*gateway, "pdmesh_kv_store_lookup_blocks_total", result="miss") == 10
    assert delta(*gateway, "pdmesh_kv_store_lookup_blocks_total", result="hit") == 0
    assert value(gateway[0], "pdmesh_num_requests_running") == 0
    assert value(gateway[0], "pdmesh_kv_store_pinned_blocks") == 0

    assert delta(*prefill, "pdmesh_rpc_requests_total", method="Prefill", code="OK") == 10
    assert delta(*prefill, "pdmesh_prefill_chunk_tokens_count") == NUM_REQUESTS
    assert delta(*prefill, "pdmesh_prefill_chunk_tokens_sum") == NUM_REQUESTS * PROMPT_LEN
    # The mesh's embedded store: a private index, block bytes in shared memory.
    put = {"path": "shm", "direction": "put"}
    assert delta(*prefill, "pdmesh_kv_transfer_blocks_total", **put) == 2 * NUM_REQUESTS
    assert delta(*prefill, "pdmesh_kv_store_lookup_blocks_total", result="miss") == 10

    get = {"path": "shm", "direction": "get"}
    assert delta(*decode, "pdmesh_rpc_requests_total", method="Decode", code="OK") == 10
    assert delta(*decode, "pdmesh_kv_transfer_blocks_total", **get) == 2 * NUM_REQUESTS
    # The pipelined hand-off pulls a request's blocks in one or more gets (as the prefill
    # publishes them): at least one get per request, never more gets than blocks.
    gets = delta(*decode, "pdmesh_kv_transfer_seconds_count", **get)
    assert NUM_REQUESTS <= gets <= 2 * NUM_REQUESTS
    # Every byte the prefill worker published for these requests is what the decode pulled.
    put_bytes = delta(*prefill, "pdmesh_kv_transfer_bytes_total", **put)
    assert put_bytes > 0
    assert delta(*decode, "pdmesh_kv_transfer_bytes_total", **get) == put_bytes
    assert delta(*decode, "pdmesh_prefill_chunk_tokens_count") == 0  # no prompt recomputed
    # NEW_TOKENS - 1 decode tokens per request, each in some step.
    assert delta(*decode, "pdmesh_engine_steps_total") >= NEW_TOKENS - 1

    for samples in (prefill[0], decode[0]):
        assert value(samples, "pdmesh_kv_blocks_used") == 0
        assert value(samples, "pdmesh_kv_blocks_free") == value(samples, "pdmesh_kv_blocks_total")
        assert value(samples, "pdmesh_num_requests_running") == 0
        assert value(samples, "pdmesh_num_requests_waiting") == 0


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.addFilter(RequestIdFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_client_request_id_is_followed_across_services(mesh: MeshThread) -> None:
    records = Records()
    logger = logging.getLogger("pdmesh.requests")
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    try:
        request = gen_pb.GenerateRequest(prompt="Hello", max_tokens=3, temperature=0)
        pieces = list(
            mesh.stub.Generate(request, metadata=(("x-request-id", "trace-42"),), timeout=120)
        )
    finally:
        logger.removeHandler(records)
    assert {p.request_id for p in pieces} == {"trace-42"}  # the gateway honoured the header
    # The workers know it inside its caller's namespace: "<caller tag>-trace-42".
    traced = [r for r in records.records if r.request_id.endswith("-trace-42")]
    traced += [r for r in records.records if r.request_id == "trace-42"]
    assert {(r.service, r.method, r.code) for r in traced} == {  # type: ignore[attr-defined]
        ("gateway", "Generate", "OK"),
        ("prefill", "Prefill", "OK"),
        ("decode", "Decode", "OK"),
    }
    gateway = next(r for r in traced if r.service == "gateway")  # type: ignore[attr-defined]
    assert gateway.request_id == "trace-42"  # type: ignore[attr-defined]
    line = json.loads(JsonFormatter().format(traced[0]))
    assert line["request_id"].endswith("trace-42") and line["level"] == "INFO"
    assert line["service"] in ("gateway", "prefill", "decode")


def test_bench_serve_measures_the_mesh_and_the_gateway_agrees(
    mesh: MeshThread, tmp_path: Path
) -> None:
    """``pdmesh bench serve --target`` end to end: JSON, plots, and its request count equals
    what the gateway's metrics counted meanwhile."""
    port = mesh.mesh.metrics_ports["gateway"]
    before = scrape(port)
    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--target", mesh.mesh.gateway_address, "--request-rate", "4",
            "inf", "--num-requests", "3", "--input-len", "8", "--output-len", "3",
            "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--warmup", "0",
            "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert [run["request_rate"] for run in result["runs"]] == [4, None]  # inf is not JSON
    for run in result["runs"]:
        assert run["completed"] == 3 and run["failed"] == 0
        assert run["total_output_tokens"] == 9 and run["total_input_tokens"] == 24
        assert run["slo_attainment"] == 1.0
        assert len(run["requests"]) == 3 and run["ttft_ms"]["p50"] > 0
    assert result["command"].startswith("pdmesh bench serve") and result["host_cores"] >= 1
    assert {Path(p).name for p in result["plots"]} == {"serve_latency_cdf.png", "serve_slo.png"}
    assert all(Path(p).stat().st_size > 10_000 for p in result["plots"])
    closed = tmp_path / "closed.json"
    argv = ["bench", "serve", "--target", mesh.mesh.gateway_address, "--concurrency", "2",
            "--num-requests", "3", "--workload", "code", "--length-scale", "0.05", "--seed", "3",
            "--warmup", "0", "--no-progress", "--out", str(closed)]  # fmt: skip
    assert main(argv) == 0
    (run,) = json.loads(closed.read_text())["runs"]
    assert run["concurrency"] == 2 and run["completed"] == 3
    closed_tokens = run["total_output_tokens"]
    after = scrape(port)
    assert delta(after, before, "pdmesh_requests_total", status="length") == 9
    assert delta(after, before, "pdmesh_generation_tokens_total") == 18 + closed_tokens
