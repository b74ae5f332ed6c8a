"""Job completion time and TTFT under fcfs vs mlfq (and priority), the engine alone.

A heavy-tailed output-length workload (mostly short chats, a fifth long generations; greedy
with ``ignore_eos`` so lengths are fixed) arrives as a Poisson process at a rate near the
engine's measured capacity. Every policy sees the same requests at the same offsets. The
engine really runs every step; with ``--clock model`` (the default) time is the step cost
fitted on this machine (a line in the step's tokens), so a shared, busy CPU times every
policy alike; ``--clock wall`` takes the wall clock instead (a GPU of one's own).

On the CPU it runs the default model; ``--device cuda --shape 8b`` runs Llama-3.1-8B's
shape with dummy bf16 weights (one engine at a time, freed before the next).

    python -m bench.sched [--requests 60] [--load 0.9] [--max-num-seqs 8]
        [--policies fcfs,mlfq,mlfq+swap] [--clock model|wall] [--device cpu|cuda]
        [--shape default|8b|135m] [--out bench/results/x.json]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.common import environment, write_json
from engine.config import CPU_THREADS_ENV, CacheConfig, EngineConfig, SchedulerConfig
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

SHORT_TOKENS = (8, 32)
LONG_TOKENS = (160, 320)
LONG_SHARE = 0.2
PROMPT_TOKENS = (16, 96)


@dataclass(frozen=True)
class Job:
    arrival_s: float
    prompt_token_ids: list[int]
    max_tokens: int

    @property
    def is_long(self) -> bool:
        return self.max_tokens >= LONG_TOKENS[0]


@dataclass
class Timing:
    first_token_s: float | None = None
    end_s: float | None = None


@dataclass
class Run:
    policy: str
    jobs: list[Job]
    timings: dict[str, Timing] = field(default_factory=dict)
    num_preemptions: int = 0
    elapsed_s: float = 0.0


def output_lengths(count: int, rng: random.Random) -> list[int]:
    """Short chats and a fifth of long generations."""
    return [
        rng.randint(*LONG_TOKENS) if rng.random() < LONG_SHARE else rng.randint(*SHORT_TOKENS)
        for _ in range(count)
    ]


def make_jobs(count: int, rate_per_s: float, seed: int, vocab: int) -> list[Job]:
    rng = random.Random(seed)
    lengths = output_lengths(count, rng)
    jobs, now = [], 0.0
    for length in lengths:
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(*PROMPT_TOKENS))]
        jobs.append(Job(now, prompt, length))
        now += rng.expovariate(rate_per_s)
    return jobs


def engine(policy: str, args: argparse.Namespace) -> LLM:
    """``policy`` is a scheduling policy, "+swap" after it swaps victims to host memory."""
    name, _, swap = policy.partition("+")
    scheduler = SchedulerConfig(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=512, policy=name
    )
    cache = CacheConfig(swap_space_gib=1.0 if swap == "swap" else 0.0)
    if args.shape == "default":
        config = EngineConfig(device=args.device, dtype="float32", scheduler=scheduler, cache=cache)
        return LLM(config)
    from bench.engine_gpu import shape_dir

    model = shape_dir(args.shape, Path(tempfile.mkdtemp(prefix=f"sched-{args.shape}-")))
    config = EngineConfig(
        model=model, load_format="dummy", dtype="bfloat16", device=args.device,
        max_model_len=1024, scheduler=scheduler, cache=cache,
    )  # fmt: skip
    return LLM(config)


def free_device_memory() -> None:
    """After the last reference to an engine is gone: its device memory, before the next
    engine loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class StepCost:
    """A step's time as a line in its token count, fitted to measured steps (least squares)."""

    base_s: float
    per_token_s: float

    def seconds(self, num_tokens: int) -> float:
        return self.base_s + self.per_token_s * num_tokens

    @classmethod
    def fit(cls, samples: list[tuple[int, float]]) -> StepCost:
        """Through the median time of each step size (a busy neighbour's stall is one
        outlier, not a slope)."""
        sizes = sorted({n for n, _ in samples})
        medians = [statistics.median(t for n, t in samples if n == size) for size in sizes]
        if len(sizes) == 1:
            return cls(medians[0], 1e-7)
        slope, intercept = statistics.linear_regression([float(n) for n in sizes], medians)
        return cls(max(intercept, 1e-4), max(slope, 1e-7))


class Clock:
    """Wall-clock time (``cost`` None) or model time: each step advances the clock by its
    fitted cost, so every policy is timed the same however busy the (shared) CPU is."""

    def __init__(self, cost: StepCost | None) -> None:
        self.cost = cost
        self.start = time.perf_counter()
        self.model_s = 0.0

    def now(self) -> float:
        return self.model_s if self.cost else time.perf_counter() - self.start

    def stepped(self, num_tokens: int) -> None:
        if self.cost:
            self.model_s += self.cost.seconds(num_tokens)

    def wait_until(self, moment: float) -> None:
        if self.cost:
            self.model_s = max(self.model_s, moment)
        else:
            time.sleep(max(0.0, moment - self.now()))


def step_tokens(llm: LLM) -> list[int]:
    """Tokens of each step the engine runs from now on (appended as they run)."""
    counts: list[int] = []
    llm.engine.step_observers.append(
        lambda chunks: counts.append(sum(c.num_tokens for c in chunks))
    )
    return counts


def calibrate(llm: LLM, max_num_seqs: int) -> StepCost:
    """Fits the step cost on batches of prompts (16 to 128 tokens, one prompt per step)
    and a full batch decoding 24 tokens each, after a warm-up."""
    rng = random.Random(1)
    vocab = llm.engine.model_config.vocab_size
    llm.generate([[1, 2, 3]] * 2, SamplingParams(max_tokens=4, ignore_eos=True))
    counts, samples = step_tokens(llm), []
    for length in (16, 32, 64, 128, 16, 32, 64, 128):  # prompt steps
        llm.add_request([rng.randrange(vocab) for _ in range(length)], SamplingParams(max_tokens=1))
        samples.append(_timed_step(llm, counts))
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    for _ in range(max_num_seqs):
        llm.add_request([rng.randrange(vocab) for _ in range(8)], params)
    while llm.engine.has_unfinished:
        samples.append(_timed_step(llm, counts))
    llm.engine.step_observers.pop()
    return StepCost.fit(samples)


def _timed_step(llm: LLM, counts: list[int]) -> tuple[int, float]:
    num_steps, start = len(counts), time.perf_counter()
    llm.step()
    return sum(counts[num_steps:]), time.perf_counter() - start


def replay(llm: LLM, run: Run, clock: Clock) -> None:
    """Adds each job at its arrival offset and steps the engine until every job ends."""
    pending = list(enumerate(run.jobs))
    seqs: list[Sequence] = []
    counts = step_tokens(llm)
    while pending or llm.engine.has_unfinished:
        now = clock.now()
        while pending and pending[0][1].arrival_s <= now:
            index, job = pending.pop(0)
            params = SamplingParams(max_tokens=job.max_tokens, temperature=0, ignore_eos=True)
            request_id = llm.add_request(job.prompt_token_ids, params, f"job-{index}")
            seqs.append(llm.engine.requests[request_id])
            run.timings[request_id] = Timing()
        if not llm.engine.has_unfinished:
            clock.wait_until(pending[0][1].arrival_s)
            continue
        num_steps = len(counts)
        outputs = llm.step()
        clock.stepped(sum(counts[num_steps:]))
        for out, _ in outputs:
            timing = run.timings[out.request_id]
            if timing.first_token_s is None and out.token_ids:
                timing.first_token_s = clock.now()
            if out.finished:
                timing.end_s = clock.now()
    llm.engine.step_observers.pop()
    run.elapsed_s = clock.now()
    run.num_preemptions = sum(s.num_preemptions for s in seqs)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def summary(run: Run) -> dict[str, Any]:
    jct: dict[str, list[float]] = {"all": [], "short": [], "long": []}
    ttft: dict[str, list[float]] = {"all": [], "short": [], "long": []}
    for index, job in enumerate(run.jobs):
        timing = run.timings[f"job-{index}"]
        assert timing.end_s is not None and timing.first_token_s is not None
        for kind in ("all", "long" if job.is_long else "short"):
            jct[kind].append(timing.end_s - job.arrival_s)
            ttft[kind].append(timing.first_token_s - job.arrival_s)
    result: dict[str, Any] = {
        "policy": run.policy,
        "elapsed_s": round(run.elapsed_s, 2),
        "num_preemptions": run.num_preemptions,
    }
    for kind in [k for k in ("all", "short", "long") if jct[k]]:
        result[kind] = {
            "num_jobs": len(jct[kind]),
            "mean_jct_s": round(statistics.fmean(jct[kind]), 3),
            "p99_jct_s": round(percentile(jct[kind], 0.99), 3),
            "mean_ttft_s": round(statistics.fmean(ttft[kind]), 3),
            "p99_ttft_s": round(percentile(ttft[kind], 0.99), 3),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--load", type=float, default=0.9, help="offered load / capacity")
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--policies", default="fcfs,mlfq")
    parser.add_argument("--clock", choices=["model", "wall"], default="model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=["default", "8b", "135m"], default="default")
    parser.add_argument("--out")
    args = parser.parse_args()
    if os.environ.get(CPU_THREADS_ENV):  # as an engine core does: a share of a shared CPU
        torch.set_num_threads(int(os.environ[CPU_THREADS_ENV]))
    policies = args.policies.split(",")
    llm: LLM | None = engine(policies[0], args)
    assert llm is not None
    cost = calibrate(llm, args.max_num_seqs)
    capacity = args.max_num_seqs / cost.seconds(args.max_num_seqs)  # decode tokens per s
    mean_output = statistics.fmean(output_lengths(10_000, random.Random(args.seed)))
    rate = args.load * capacity / mean_output
    vocab = llm.engine.model_config.vocab_size
    jobs = make_jobs(args.requests, rate, args.seed, vocab)
    print(f"step {cost}; capacity {capacity:.1f} tok/s, mean output {mean_output:.1f}, "
          f"{rate:.3f} req/s")  # fmt: skip
    results = []
    for policy in policies:
        llm = llm or engine(policy, args)
        run = Run(policy, jobs)
        replay(llm, run, Clock(cost if args.clock == "model" else None))
        results.append(summary(run))
        print(results[-1], flush=True)
        llm = None  # one engine on the device at a time
        free_device_memory()
    payload = {
        "environment": environment(),
        "workload": {
            "requests": args.requests, "load": args.load, "rate_per_s": round(rate, 4),
            "clock": args.clock, "step_base_s": cost.base_s, "step_per_token_s": cost.per_token_s,
            "capacity_tokens_per_s": round(capacity, 1), "max_num_seqs": args.max_num_seqs,
            "short_tokens": SHORT_TOKENS, "long_tokens": LONG_TOKENS, "long_share": LONG_SHARE,
            "prompt_tokens": PROMPT_TOKENS, "seed": args.seed, "device": args.device,
            "shape": args.shape,
        },
        "results": results,
    }  # fmt: skip
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
