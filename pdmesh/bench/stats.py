"""Latency statistics, SLO attainment and goodput of one benchmark run.

Per request: TTFT (send to first token), TPOT (mean gap per token after the first:
``(e2e - ttft) / (output tokens - 1)``), inter-token latencies (gaps between streamed
messages) and end-to-end latency. Goodput, after DistServe: completed requests per second that
met both the TTFT and the TPOT SLO; SLO attainment is their share of all requests sent.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class SLO:
    """Latency objectives in milliseconds; None means no objective on that metric."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"SLO {name} must be positive, got {value}")


@dataclass
class RequestResult:
    """What the client saw of one request (seconds)."""

    prompt_len: int
    output_len: int = 0
    success: bool = False
    error: str = ""
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itls_s: list[float] = field(default_factory=list)

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first (0 for a one-token output)."""
        if self.output_len <= 1:
            return 0.0
        return (self.e2e_s - self.ttft_s) / (self.output_len - 1)

    def meets(self, slo: SLO) -> bool:
        if not self.success:
            return False
        ttft_ok = slo.ttft_ms is None or self.ttft_s * 1e3 <= slo.ttft_ms
        tpot_ok = slo.tpot_ms is None or self.tpot_s * 1e3 <= slo.tpot_ms
        return ttft_ok and tpot_ok


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's
    default); NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize_ms(values_s: Sequence[float]) -> dict[str, float]:
    """Mean and percentiles of seconds, in milliseconds."""
    values = [v * 1e3 for v in values_s]
    summary = {"mean": sum(values) / len(values) if values else math.nan}
    for q in PERCENTILES:
        summary[f"p{q}"] = percentile(values, q)
    return summary


def report(results: Sequence[RequestResult], duration_s: float, slo: SLO) -> dict[str, Any]:
    """The run's numbers: counts, throughput, latency summaries, goodput."""
    if not duration_s > 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    done = [r for r in results if r.success]
    output_tokens = sum(r.output_len for r in done)
    input_tokens = sum(r.prompt_len for r in done)
    good = sum(r.meets(slo) for r in results)
    return {
        "num_requests": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": dict(collections.Counter(r.error[:120] for r in results if not r.success)),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "output_token_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "ttft_ms": summarize_ms([r.ttft_s for r in done]),
        "tpot_ms": summarize_ms([r.tpot_s for r in done if r.output_len > 1]),
        "itl_ms": summarize_ms([gap for r in done for gap in r.itls_s]),
        "e2e_ms": summarize_ms([r.e2e_s for r in done]),
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        "slo_attainment": good / len(results) if results else math.nan,
        "goodput": good / duration_s,
    }
