"""Percentiles, TPOT, SLO attainment and goodput on hand-computed inputs."""

from __future__ import annotations

import math

import pytest

from pdmesh.bench.stats import SLO, RequestResult, percentile, report


def test_percentile_interpolates_linearly_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # sorted: 1 2 3 4
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)  # rank 2.7
    assert percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(values, 101)


def make(ttft: float, e2e: float, tokens: int, ok: bool = True) -> RequestResult:
    itls = [(e2e - ttft) / (tokens - 1)] * (tokens - 1) if tokens > 1 else []
    return RequestResult(10, tokens, ok, "" if ok else "boom", ttft, e2e, itls)


def test_report_counts_goodput_and_attainment_exactly() -> None:
    results = [
        make(0.1, 1.1, 11),  # TPOT 100 ms: meets both
        make(0.1, 2.1, 11),  # TPOT 200 ms: misses TPOT
        make(0.5, 0.5, 1),  # one token (TPOT 0): misses TTFT
        make(0.2, 0.2, 1),  # meets both
        make(0.0, 0.0, 0, ok=False),  # failed: never meets
    ]
    numbers = report(results, duration_s=2.0, slo=SLO(ttft_ms=300, tpot_ms=150))
    assert numbers["completed"] == 4 and numbers["failed"] == 1
    assert numbers["slo_attainment"] == pytest.approx(2 / 5)
    assert numbers["goodput"] == pytest.approx(1.0)  # 2 good requests in 2 s
    assert numbers["request_throughput"] == pytest.approx(2.0)
    assert numbers["total_output_tokens"] == 24
    assert numbers["output_token_throughput"] == pytest.approx(12.0)
    assert numbers["total_token_throughput"] == pytest.approx(32.0)
    assert numbers["ttft_ms"]["mean"] == pytest.approx(225.0)
    assert numbers["ttft_ms"]["p50"] == pytest.approx(150.0)
    assert numbers["tpot_ms"]["p50"] == pytest.approx(150.0)  # only multi-token outputs
    assert numbers["itl_ms"]["p99"] == pytest.approx(200.0)
    assert numbers["e2e_ms"]["p90"] == pytest.approx(1.1 * 1e3 + 0.7 * 1e3)  # rank 2.7


def test_no_slo_means_every_completed_request_is_good() -> None:
    numbers = report([make(9.0, 99.0, 3), make(0, 0, 0, ok=False)], 1.0, SLO())
    assert numbers["slo_attainment"] == 0.5 and numbers["goodput"] == 1.0
    with pytest.raises(ValueError):
        SLO(ttft_ms=0)
