"""The HTTP-vs-gRPC benchmark's rows: the rounds of each protocol averaged, HTTP over gRPC,
and the verdict against the target (no mesh: the rows are bookkeeping on run reports)."""

from __future__ import annotations

from typing import Any

import pytest

from bench.http_vs_grpc_gpu import side_by_side


def run(protocol: str, tok_s: float, tpot_p50: float, failed: int = 0) -> dict[str, Any]:
    stats = {"p50": tpot_p50, "p90": 2 * tpot_p50}
    return {
        "protocol": protocol, "concurrency": 64, "output_token_throughput": tok_s,
        "ttft_ms": {"p50": 10 * tpot_p50, "p90": 20 * tpot_p50}, "tpot_ms": stats,
        "failed": failed,
    }  # fmt: skip


def test_rounds_are_averaged_and_compared() -> None:
    row = side_by_side(
        [run("grpc", 1000, 10), run("grpc", 1200, 12)],
        [run("http", 950, 11), run("http", 1030, 12)],
        target=0.10,
    )
    assert (row["concurrency"], row["rounds"]) == (64, 2)
    assert (row["grpc_tok_s"], row["http_tok_s"]) == (1100, 990)
    assert row["http_over_grpc_tok_s"] == pytest.approx(0.9)
    assert row["http_over_grpc_tpot_p50_ms"] == pytest.approx(11.5 / 11)
    assert row["grpc_ttft_p90_ms"] == pytest.approx(220)
    assert row["http_within_target"] and row["failed"] == 0


@pytest.mark.parametrize(
    ("http_tok_s", "failed", "within"), [(899, 0, False), (1000, 1, False), (1100, 0, True)]
)
def test_the_verdict_needs_the_throughput_and_no_failures(
    http_tok_s: float, failed: int, within: bool
) -> None:
    row = side_by_side([run("grpc", 1000, 10)], [run("http", http_tok_s, 10, failed)], 0.10)
    assert row["http_within_target"] is within
