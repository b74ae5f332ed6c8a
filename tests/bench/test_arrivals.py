"""Arrival times: Poisson by default, gamma gaps for burstiness, reproducible with a seed."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest

from pdmesh.bench.arrivals import arrival_offsets


def gaps(offsets: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(offsets)]


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gap_mean_is_one_over_rate_and_spread_follows_burstiness(burstiness: float) -> None:
    offsets = arrival_offsets(20_000, rate=4.0, burstiness=burstiness, seed=3)
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    intervals = gaps(offsets)
    mean = statistics.fmean(intervals)
    assert mean == pytest.approx(0.25, rel=0.05)
    # A gamma with shape k has coefficient of variation 1/sqrt(k) (1 for Poisson).
    assert statistics.stdev(intervals) / mean == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)


def test_poisson_counts_per_second_have_variance_equal_to_mean() -> None:
    offsets = arrival_offsets(40_000, rate=5.0, seed=11)
    counts = [0] * int(offsets[-1])
    for t in offsets:
        if int(t) < len(counts):
            counts[int(t)] += 1
    assert statistics.fmean(counts) == pytest.approx(5.0, rel=0.05)
    assert statistics.variance(counts) == pytest.approx(5.0, rel=0.1)


def test_seeded_and_infinite_rate() -> None:
    assert arrival_offsets(50, 2.0, seed=5) == arrival_offsets(50, 2.0, seed=5)
    assert arrival_offsets(50, 2.0, seed=5) != arrival_offsets(50, 2.0, seed=6)
    assert arrival_offsets(3, math.inf) == [0.0, 0.0, 0.0]
    for bad in ({"rate": 0.0}, {"rate": 1.0, "burstiness": 0.0}):
        with pytest.raises(ValueError):
            arrival_offsets(3, **bad)
