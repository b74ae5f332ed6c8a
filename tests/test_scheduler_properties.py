"""Properties of the scheduler and block manager over random workloads (hypothesis): budgets
hold every step, every token is computed once per life of a sequence, the KV a chunk attends
to is its own prefix's, nothing leaks, nobody starves. Pure Python, no model."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.scheduling_policy import MLFQPolicy
from engine.sequence import FinishReason, Sequence, SequenceStatus
from engine.swap import SwapSpace


@dataclass(frozen=True)
class Request:
    arrival_step: int
    prompt: list[int]
    max_tokens: int
    priority: int = 0


@dataclass(frozen=True)
class Workload:
    block_size: int
    num_blocks: int
    max_num_seqs: int
    budget: int
    prefix_caching: bool
    requests: list[Request]

    @property
    def total_tokens(self) -> int:
        return sum(len(r.prompt) + r.max_tokens for r in self.requests)


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    block_size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    max_num_seqs = draw(st.integers(1, 8))
    budget = draw(st.integers(max_num_seqs, 48))
    # A small alphabet and a few shared prefixes make prefix-cache hits (and misses) common.
    token = st.integers(0, 5)
    prefixes = draw(st.lists(st.lists(token, max_size=48), min_size=1, max_size=3))
    requests = []
    for _ in range(draw(st.integers(1, 10))):
        prefix = draw(st.sampled_from(prefixes))
        prompt = prefix[: draw(st.integers(0, len(prefix)))] + draw(st.lists(token, max_size=40))
        requests.append(
            Request(
                arrival_step=draw(st.integers(0, 12)),
                prompt=prompt or [draw(token)],
                max_tokens=draw(st.integers(1, 16)),
                priority=draw(st.integers(0, 3)),
            )
        )
    # Like Engine._validate: every request fits the cache on its own.
    needed = max(blocks_for(len(r.prompt) + r.max_tokens, block_size) for r in requests)
    return Workload(
        block_size=block_size,
        num_blocks=needed + draw(st.integers(0, 24)),
        max_num_seqs=max_num_seqs,
        budget=budget,
        prefix_caching=draw(st.booleans()),
        requests=requests,
    )


def fake_token(seq: Sequence) -> int:
    """Stands in for greedy sampling: a function of the sequence's content."""
    return (seq.token_ids[-1] * 7 + len(seq.token_ids)) % 6


@dataclass
class Life:
    """A sequence's computation since its last (re)admission."""

    num_preemptions: int
    #: Where its first chunk started: tokens before it were prefix-cache hits.
    start: int
    next_start: int


@dataclass
class Tracker:
    """Everything the properties need that the scheduler does not record itself."""

    block_size: int
    #: key of (block id, offset): which token prefix the K/V in that slot belongs to.
    shadow_kv: dict[int, list[object]] = field(default_factory=dict)
    #: the same for host blocks (swapping).
    shadow_host: dict[int, list[object]] = field(default_factory=dict)
    #: prefix keys of each sequence: keys[p] identifies token_ids[: p + 1].
    keys: dict[str, list[object]] = field(default_factory=dict)
    lives: dict[str, Life] = field(default_factory=dict)
    #: how many times each position of each sequence was computed.
    counts: dict[str, list[int]] = field(default_factory=dict)
    hit_tokens: dict[str, int] = field(default_factory=dict)
    admission_order: list[str] = field(default_factory=list)
    #: Steps each request has gone without running, now and at the longest.
    gaps: dict[str, int] = field(default_factory=dict)
    max_gaps: dict[str, int] = field(default_factory=dict)

    def apply_swaps(self, out: SchedulerOutput) -> frozenset[str]:
        """Copies the shadow K/V as the engine copies blocks; the swapped-in requests."""
        for device_id, host_id in out.swap_out:
            self.shadow_host[host_id] = list(
                self.shadow_kv.get(device_id, [None] * self.block_size)
            )
        for device_id, host_id in out.swap_in:
            self.shadow_kv[device_id] = list(self.shadow_host[host_id])
        filled = {device_id for device_id, _ in out.swap_in}
        return frozenset(
            c.seq.request_id for c in out.chunks if filled.intersection(c.seq.block_table)
        )

    def note_gaps(self, scheduler: Scheduler, out: SchedulerOutput) -> None:
        ran = {c.seq.request_id for c in out.chunks}
        for seq in [*scheduler.running, *scheduler.waiting]:
            rid = seq.request_id
            self.gaps[rid] = 0 if rid in ran else self.gaps.get(rid, 0) + 1
            self.max_gaps[rid] = max(self.max_gaps.get(rid, 0), self.gaps[rid])
            policy = scheduler.policy
            if isinstance(policy, MLFQPolicy) and self.gaps[rid] > policy.config.promotion_period:
                assert policy.level(seq) == 0, f"{rid} starves below level 0"

    def prefix_keys(self, seq: Sequence) -> list[object]:
        keys = self.keys.setdefault(seq.request_id, [])
        for token_id in seq.token_ids[len(keys) :]:
            keys.append(hash((keys[-1] if keys else None, token_id)))
        return keys

    def check_context(self, seq: Sequence, end: int) -> None:
        """The cache slots the sequence's block table names for positions [0, end) hold the
        K/V of exactly its own prefix."""
        size = self.block_size
        seen: list[object] = []
        for block_id in seq.block_table[: blocks_for(end, size)]:
            seen.extend(self.shadow_kv.get(block_id, [None] * size))
        assert seen[:end] == self.prefix_keys(seq)[:end], seq.request_id


def check_step(
    scheduler: Scheduler,
    out: SchedulerOutput,
    tracker: Tracker,
    decoding: list[Sequence],
    preemptions_before: dict[str, int],
    swapped_in: frozenset[str] = frozenset(),
) -> None:
    config = scheduler.config
    blocks = scheduler.blocks
    size = blocks.block_size
    chunks = out.chunks
    assert sum(c.num_tokens for c in chunks) <= config.max_num_batched_tokens
    assert len(chunks) <= config.max_num_seqs
    assert len(scheduler.running) <= config.max_num_seqs
    assert len({c.seq.request_id for c in chunks}) == len(chunks), "one chunk per sequence"
    scheduled = {c.seq.request_id for c in chunks}
    for seq in decoding:  # stall-free: a decode runs unless it was preempted this step
        preempted = seq.num_preemptions > preemptions_before[seq.request_id]
        assert seq.request_id in scheduled or preempted, seq.request_id
    for chunk in chunks:
        seq = chunk.seq
        rid = seq.request_id
        assert seq.status is SequenceStatus.RUNNING
        assert 0 <= chunk.start < chunk.end <= seq.num_tokens
        assert chunk.completes == (chunk.end == seq.num_tokens)
        assert chunk.end <= len(seq.block_table) * size, "blocks cover the chunk"
        life = tracker.lives.get(rid)
        if life is None or life.num_preemptions != seq.num_preemptions:
            # (Re)admitted: it starts at 0 or after whole prefix-cache hits (or, swapped
            # back in, after the tokens it had computed).
            if rid not in swapped_in:
                assert chunk.start % size == 0
                assert chunk.start == 0 or blocks.enable_prefix_caching
            if life is None:
                tracker.admission_order.append(rid)
                tracker.hit_tokens[rid] = chunk.start
            tracker.check_context(seq, chunk.start)
            tracker.lives[rid] = Life(seq.num_preemptions, chunk.start, chunk.end)
        else:
            assert chunk.start == life.next_start, "no gap, no overlap"
            life.next_start = chunk.end
        keys = tracker.prefix_keys(seq)
        counts = tracker.counts.setdefault(rid, [])
        counts.extend([0] * (chunk.end - len(counts)))
        for position in range(chunk.start, chunk.end):
            block_id = seq.block_table[position // size]
            # Writes only ever go to blocks no other sequence holds.
            assert blocks.allocator.ref_counts[block_id] == 1
            slots = tracker.shadow_kv.setdefault(block_id, [None] * size)
            slots[position % size] = keys[position]
            counts[position] += 1
        tracker.check_context(seq, chunk.end)


def check_queues(scheduler: Scheduler, arrival_rank: dict[str, int]) -> None:
    """Reference counts equal the number of block tables naming each block; free blocks are
    exactly the unreferenced ones; only running sequences hold blocks. First come, first
    served: the running batch is the earliest arrivals, in order, and the waiting queue the
    rest, in order (a preempted request resumes before anything that arrived after it)."""
    check_blocks(scheduler)
    order = [arrival_rank[s.request_id] for s in [*scheduler.running, *scheduler.waiting]]
    assert order == sorted(order)


def check_blocks(scheduler: Scheduler) -> None:
    """No leaked or duplicated blocks, whatever the policy."""
    allocator = scheduler.blocks.allocator
    holders = [0] * allocator.num_blocks
    for seq in scheduler.running:
        assert len(set(seq.block_table)) == len(seq.block_table)
        for block_id in seq.block_table:
            holders[block_id] += 1
    assert all(not seq.block_table for seq in scheduler.waiting)
    assert allocator.ref_counts == holders
    assert set(allocator.free_queue) == {b for b, n in enumerate(holders) if n == 0}
    if scheduler.swap is not None:  # host blocks: exactly those of swapped-out requests
        host = [b for s in scheduler.waiting for b in s.host_block_table]
        assert all(not s.host_block_table for s in scheduler.running)
        assert len(set(host)) == len(host)
        assert set(host) == set(range(scheduler.swap.allocator.num_blocks)) - set(
            scheduler.swap.allocator.free_queue
        )
    assert len({id(s) for s in [*scheduler.running, *scheduler.waiting]}) == len(
        scheduler.running
    ) + len(scheduler.waiting), "a sequence is queued twice"


def run(
    workload: Workload, config: SchedulerConfig | None = None, swap_blocks: int = 0
) -> tuple[list[Sequence], Tracker, int]:
    """Runs ``workload`` to its end under ``config``'s policy (default fcfs), checking every
    step; ``Tracker.max_gaps`` records how long each request went without running."""
    block_manager = BlockManager(
        workload.num_blocks, workload.block_size, b"props", workload.prefix_caching
    )
    config = replace(
        config or SchedulerConfig(),
        max_num_seqs=workload.max_num_seqs,
        max_num_batched_tokens=workload.budget,
    )
    is_fcfs = config.policy == "fcfs"
    swap = SwapSpace(swap_blocks, lambda seq: True) if swap_blocks else None
    scheduler = Scheduler(config, block_manager, swap)
    tracker = Tracker(workload.block_size)
    seqs = [
        Sequence(
            str(i),
            list(r.prompt),
            SamplingParams(max_tokens=r.max_tokens),
            frozenset(),
            priority=r.priority,
        )
        for i, r in enumerate(workload.requests)
    ]
    sorted_arrivals = sorted(range(len(seqs)), key=lambda i: workload.requests[i].arrival_step)
    arrival_rank = {seqs[i].request_id: rank for rank, i in enumerate(sorted_arrivals)}
    arrivals = list(sorted_arrivals)
    # Every step computes at least one token; recomputation after preemptions is the only
    # extra work (5,000 random workloads needed at most 0.95 steps per token).
    max_steps = max(r.arrival_step for r in workload.requests) + 2 * workload.total_tokens
    step = 0
    while arrivals or scheduler.has_unfinished:
        while arrivals and workload.requests[arrivals[0]].arrival_step <= step:
            scheduler.add(seqs[arrivals.pop(0)])
        decoding = [
            s for s in scheduler.running if s.output_token_ids and s.num_uncomputed_tokens == 1
        ]
        preemptions = {s.request_id: s.num_preemptions for s in seqs}
        out = scheduler.schedule()
        assert out.chunks or not scheduler.has_unfinished, "work left but nothing scheduled"
        swapped_in = tracker.apply_swaps(out)
        check_step(scheduler, out, tracker, decoding, preemptions, swapped_in)
        tracker.note_gaps(scheduler, out)
        for chunk in out.chunks:  # as Engine.step applies a step
            seq = chunk.seq
            seq.num_computed_tokens = chunk.end
            block_manager.commit_computed(seq)
            if chunk.completes:
                seq.append_token(fake_token(seq), None)
                if len(seq.output_token_ids) >= seq.params.max_tokens:
                    scheduler.finish(seq, FinishReason.LENGTH)
        check_queues(scheduler, arrival_rank) if is_fcfs else check_blocks(scheduler)
        step += 1
        assert step <= max_steps, "a request starves"
    allocator = block_manager.allocator
    assert allocator.num_used == 0 and set(allocator.ref_counts) == {0}
    assert allocator.num_free == workload.num_blocks
    if is_fcfs:  # first admissions happen in arrival order
        assert tracker.admission_order == [seqs[i].request_id for i in sorted_arrivals]
    return seqs, tracker, step


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_keep_every_invariant(workload: Workload) -> None:
    seqs, tracker, _ = run(workload)
    event(f"preempted: {any(s.num_preemptions for s in seqs)}")
    event(f"prefix hits: {any(tracker.hit_tokens.values())}")
    event(f"chunked prefill: {any(len(r.prompt) > workload.budget for r in workload.requests)}")
    for seq, request in zip(seqs, workload.requests, strict=True):
        assert seq.finish_reason is FinishReason.LENGTH
        assert len(seq.output_token_ids) == request.max_tokens
        counts = tracker.counts[seq.request_id]
        # The last token is sampled and returned, never computed.
        assert len(counts) == len(request.prompt) + request.max_tokens - 1
        hits = tracker.hit_tokens[seq.request_id]
        if seq.num_preemptions == 0:
            assert counts == [0] * hits + [1] * (len(counts) - hits)
        else:  # recomputation (after a preemption) is the only repeat
            assert all(n <= 1 + seq.num_preemptions for n in counts)
            # The last life computed everything after its own prefix-cache hits.
            assert all(n >= 1 for n in counts[tracker.lives[seq.request_id].start :])
        if not workload.prefix_caching:
            assert hits == 0 and seq.num_cached_tokens == 0


@settings(max_examples=60, deadline=None)
@given(workloads())
def test_ample_cache_never_preempts_and_prefix_caching_only_saves_work(
    workload: Workload,
) -> None:
    """With a block for every token of every request there is nothing to preempt, and turning
    the prefix cache on never adds computed tokens."""
    size = workload.block_size
    enough = sum(blocks_for(len(r.prompt) + r.max_tokens, size) for r in workload.requests)
    plain = replace(workload, num_blocks=enough, prefix_caching=False)
    cached = replace(plain, prefix_caching=True)
    plain_seqs, plain_tracker, _ = run(plain)
    cached_seqs, cached_tracker, _ = run(cached)
    assert all(s.num_preemptions == 0 for s in plain_seqs + cached_seqs)
    for plain_seq, cached_seq in zip(plain_seqs, cached_seqs, strict=True):
        assert plain_seq.output_token_ids == cached_seq.output_token_ids
    plain_work = sum(sum(c) for c in plain_tracker.counts.values())
    cached_work = sum(sum(c) for c in cached_tracker.counts.values())
    assert cached_work <= plain_work
