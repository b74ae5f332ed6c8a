"""PNG plots of benchmark results (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2e_ms", "end-to-end latency"))


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("no plots: matplotlib is not installed (pip install 'pdmesh[bench]')")
        return False
    return True


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_cdfs(runs: Sequence[Mapping[str, Any]], path: str, title: str) -> str:
    """One panel per metric (TTFT, TPOT, e2e), one CDF line per run (its ``label``)."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(METRICS), figsize=(15, 4.2))
    for axis, (key, name) in zip(axes, METRICS, strict=True):
        for run in runs:
            values = sorted(r[key] for r in run["requests"] if r["success"] and r[key] is not None)
            if values:
                fractions = [(i + 1) / len(values) for i in range(len(values))]
                axis.step(values, fractions, where="post", label=run["label"])
        axis.set_xlabel(f"{name} (ms)")
        axis.set_ylabel("fraction of requests")
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, plt, path)


def slo_vs_rate(series: Mapping[str, Sequence[Mapping[str, Any]]], path: str, title: str) -> str:
    """SLO attainment (left) and goodput (right) against request rate, one line per series
    (e.g. colocated and disaggregated)."""
    plt = _pyplot()
    figure, (attain, goodput) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, runs in series.items():
        rates = [run["request_rate"] for run in runs]
        attain.plot(rates, [100 * run["slo_attainment"] for run in runs], "o-", label=label)
        goodput.plot(rates, [run["goodput"] for run in runs], "o-", label=label)
    attain.set_ylabel("SLO attainment (%)")
    attain.set_ylim(0, 105)
    goodput.set_ylabel("goodput (requests/s within SLO)")
    for axis in (attain, goodput):
        axis.set_xlabel("request rate (requests/s)")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, plt, path)


def _save(figure: Any, plt: Any, path: str) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"wrote {path}")
    return path
