"""CPU time of a process tree, from /proc (Linux): which service of a served run is busy.

``snapshot`` records, for every process under the given roots, its command, total CPU
seconds and its busiest thread's CPU seconds; ``usage`` turns two snapshots into cores used
over the wall time between them. A Python process whose busiest thread sits near 1.0 core is
bound by its event loop (its GIL), whatever the other threads do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ProcessCpu:
    name: str
    cpu_s: float
    threads: dict[int, float]


def _cpu_seconds(stat_path: Path) -> float:
    fields = stat_path.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _name(pid: int) -> str:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    words = [a.decode(errors="replace") for a in argv if a]
    skip = {"-m", "-c"}
    kept = [w for w in words[1:] if w not in skip and not w.startswith("--")][:4]
    return " ".join(kept)[:80] or words[0]


def snapshot(roots: list[int]) -> dict[int, ProcessCpu]:
    """Every live process under ``roots`` (the roots included)."""
    seen: dict[int, ProcessCpu] = {}
    pending = list(roots)
    while pending:
        pid = pending.pop()
        if pid in seen:
            continue
        try:
            threads = {}
            for task in Path(f"/proc/{pid}/task").glob("*"):
                threads[int(task.name)] = _cpu_seconds(task / "stat")
            seen[pid] = ProcessCpu(_name(pid), _cpu_seconds(Path(f"/proc/{pid}/stat")), threads)
        except (OSError, ValueError, IndexError):
            continue
        pending += _children(pid)
    return seen


def usage(
    before: dict[int, ProcessCpu], after: dict[int, ProcessCpu], wall_s: float
) -> list[dict[str, Any]]:
    """Cores each process used between the snapshots (and its busiest thread), busiest
    first; processes that used less than 5% of a core are left out."""
    rows = []
    for pid, now in after.items():
        then = before.get(pid, ProcessCpu(now.name, 0.0, {}))
        busiest = max(
            (cpu - then.threads.get(tid, 0.0) for tid, cpu in now.threads.items()), default=0.0
        )
        cores = (now.cpu_s - then.cpu_s) / wall_s
        if cores >= 0.05:
            rows.append({"pid": pid, "process": now.name, "cores": round(cores, 2),
                         "busiest_thread_cores": round(busiest / wall_s, 2)})  # fmt: skip
    return sorted(rows, key=lambda row: -row["cores"])


class PeakSampler:
    """Samples the trees of ``roots`` every ``interval_s`` in a thread; ``peaks()`` gives each
    process's busiest window (cores, and its busiest thread's), the saturation signal that
    an average over start-up and idle tails hides."""

    def __init__(self, roots: list[int], interval_s: float = 1.0) -> None:
        import threading

        self.roots = roots
        self.interval_s = interval_s
        self._peaks: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import time

        before, then = snapshot(self.roots), time.perf_counter()
        while not self._stop.wait(self.interval_s):
            after, now = snapshot(self.roots), time.perf_counter()
            for row in usage(before, after, now - then):
                peak = self._peaks.setdefault(row["pid"], dict(row))
                peak["cores"] = max(peak["cores"], row["cores"])
                peak["busiest_thread_cores"] = max(
                    peak["busiest_thread_cores"], row["busiest_thread_cores"]
                )
            before, then = after, now

    def peaks(self) -> list[dict[str, Any]]:
        return sorted(self._peaks.values(), key=lambda row: -row["cores"])
