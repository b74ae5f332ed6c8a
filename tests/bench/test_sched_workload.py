"""The scheduling benchmark's workload: heavy-tailed output lengths (a fifth long), Poisson
arrivals, the same jobs for every policy (a seed), and its summary's numbers."""

from __future__ import annotations

import itertools
import statistics

import pytest

from bench.sched import LONG_TOKENS, SHORT_TOKENS, Run, Timing, make_jobs, summary


def test_jobs_are_reproducible_heavy_tailed_and_poisson() -> None:
    jobs = make_jobs(4000, rate_per_s=2.0, seed=5, vocab=100)
    assert jobs == make_jobs(4000, rate_per_s=2.0, seed=5, vocab=100)
    assert [j.arrival_s for j in jobs] == sorted(j.arrival_s for j in jobs)
    long = [j for j in jobs if j.is_long]
    assert len(long) / len(jobs) == pytest.approx(0.2, abs=0.03)
    assert all(LONG_TOKENS[0] <= j.max_tokens <= LONG_TOKENS[1] for j in long)
    short = [j for j in jobs if not j.is_long]
    assert all(SHORT_TOKENS[0] <= j.max_tokens <= SHORT_TOKENS[1] for j in short)
    gaps = [b.arrival_s - a.arrival_s for a, b in itertools.pairwise(jobs)]
    assert statistics.fmean(gaps) == pytest.approx(0.5, rel=0.06)


def test_summary_reports_jct_and_ttft_per_class() -> None:
    jobs = make_jobs(2, rate_per_s=1.0, seed=0, vocab=10)
    run = Run("fcfs", jobs)
    for index, job in enumerate(jobs):
        run.timings[f"job-{index}"] = Timing(job.arrival_s + 0.5, job.arrival_s + 2.0 + index)
    result = summary(run)
    assert result["all"]["num_jobs"] == 2
    assert result["all"]["mean_ttft_s"] == 0.5 and result["all"]["mean_jct_s"] == 2.5
    assert result["all"]["p99_jct_s"] == 3.0
