"""Picks workers by load and by prefix affinity.

Prefill (or colocated) workers: the gateway counts the uncached prompt tokens it has in flight
on each worker itself (exact and immediate) and remembers which prompt blocks it sent where.
A request goes to the worker already holding most of its leading blocks, as SGLang's
cache-aware router and Dynamo's KV router do, but only among workers whose outstanding tokens
are within ``max_imbalance_tokens`` of the least loaded one, so affinity cannot pile everything
on one worker. Decode workers: most free KV blocks in their last Load report, less the
requests sent since. Under the priority scheduling policy (which each worker reports in its
Load) only the requests a new one does not outrank count against a worker, and the blocks of
those it does outrank count as room, so an urgent request goes where nothing at least as
urgent is ahead of it rather than queueing behind one. A worker whose calls fail with
UNAVAILABLE, or whose Load stops answering, leaves the rotation until it answers again. Load
polls run on a thread of their own (``gateway.load_poller``), so a busy gateway loop cannot
make a healthy worker's poll late.
A worker whose Load reports a KV namespace other than the mesh's (``gateway.mesh_model``) is
refused: never routed to, until it reports the mesh's again (restarted with the right flags).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from gateway.load_poller import LoadPoller, PollResult, ask_load
from gateway.sessions import WorkerSession
from kvstore.block_hash import BlockHash
from pdmesh.v1 import worker_pb2 as worker_pb
from pdmesh.v1 import worker_pb2_grpc as worker_grpc
from serving.request_log import client_interceptors
from serving.rpc import WorkerUnavailableError

logger = logging.getLogger(__name__)

LOAD_POLL_S = 0.5
LOAD_TIMEOUT_S = 2.0
#: Load polls in a row that may time out before a worker counts as gone: a slow answer (a
#: busy worker or gateway) is not a dead worker; a refused connection or an out-of-service
#: answer is, at once.
SLOW_POLLS_TOLERATED = 3
#: Block hashes remembered per worker for affinity (an LRU; older prefixes are forgotten).
AFFINITY_CAPACITY = 200_000
STUBS = {
    "prefill": worker_grpc.PrefillWorkerStub,
    "decode": worker_grpc.DecodeWorkerStub,
    "colocated": worker_grpc.ColocatedWorkerStub,
}


@dataclass(eq=False)
class Worker:
    address: str
    role: str
    channel: grpc.aio.Channel
    stub: Any
    healthy: bool = True
    outstanding_tokens: int = 0
    in_flight: int = 0
    routed_tokens: int = 0
    last_load: worker_pb.LoadReport = field(default_factory=worker_pb.LoadReport)
    recent_blocks: OrderedDict[BlockHash, None] = field(default_factory=OrderedDict)
    #: The last requests routed here (for operators and tests).
    recent_requests: deque[str] = field(default_factory=lambda: deque(maxlen=256))
    #: The one stream every request routed here travels on.
    session: WorkerSession = field(init=False)
    #: Load polls in a row that timed out.
    slow_polls: int = 0
    #: The KV namespace it serves when that is not the mesh's (it is then never routed to).
    refused: str | None = None
    #: ``in_flight`` and ``outstanding_tokens`` by request priority.
    requests_by_priority: Counter[int] = field(default_factory=Counter)
    tokens_by_priority: Counter[int] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        def broken() -> None:  # out of rotation until its Load answers again
            self.healthy = False

        self.session = WorkerSession(lambda commands: self.stub.Session(commands), broken)

    def load_answered(self, report: worker_pb.LoadReport) -> None:
        self.last_load = report
        self.healthy = True
        self.slow_polls = 0

    def load_failed(self, code: grpc.StatusCode) -> bool:
        """Records a failed Load poll; whether the worker is now out of rotation."""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            self.slow_polls += 1
            if self.slow_polls < SLOW_POLLS_TOLERATED:
                return not self.healthy
        self.healthy = False
        return True

    @property
    def routable(self) -> bool:
        return self.healthy and self.refused is None

    @property
    def state(self) -> str:
        """serving, unreachable or refused (metrics and operators)."""
        if self.refused is not None:
            return "refused"
        return "serving" if self.healthy else "unreachable"

    @property
    def free_blocks(self) -> int:
        return self.last_load.num_free_blocks

    @property
    def serves_by_priority(self) -> bool:
        return self.last_load.scheduling_policy == "priority"

    def hold(self, priority: int, requests: int, tokens: int = 0) -> None:
        """Counts (negative: uncounts) requests and uncached prompt tokens of ``priority``
        the gateway has in flight here."""
        self.in_flight += requests
        self.outstanding_tokens += tokens
        self.requests_by_priority[priority] += requests
        self.tokens_by_priority[priority] += tokens

    def ahead(self, priority: int) -> tuple[int, int]:
        """Requests and prompt tokens in flight here that a new request of ``priority``
        would not overtake: under the priority policy those of a value at most its own,
        under fcfs and mlfq all of them."""
        if not self.serves_by_priority:
            return self.in_flight, self.outstanding_tokens
        requests = sum(n for p, n in self.requests_by_priority.items() if p <= priority)
        tokens = sum(n for p, n in self.tokens_by_priority.items() if p <= priority)
        return requests, tokens

    def decode_room(self, priority: int) -> int:
        """Blocks a new decode of ``priority`` can count on: the free ones less one per
        request ahead of it (those sent since the last report hold blocks it still counts
        free), plus the share of used blocks held by requests it would preempt."""
        ahead, _ = self.ahead(priority)
        behind = self.in_flight - ahead
        preemptable = self.last_load.num_used_blocks * behind // max(self.in_flight, 1)
        return self.free_blocks + preemptable - ahead

    def matched_blocks(self, hashes: Sequence[BlockHash]) -> int:
        count = 0
        for block_hash in hashes:
            if block_hash not in self.recent_blocks:
                break
            count += 1
        return count

    def remember(self, hashes: Sequence[BlockHash]) -> None:
        for block_hash in hashes:
            self.recent_blocks[block_hash] = None
            self.recent_blocks.move_to_end(block_hash)
        while len(self.recent_blocks) > AFFINITY_CAPACITY:
            self.recent_blocks.popitem(last=False)


CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.max_send_message_length", 256 << 20),
    # A restarted worker is found within a few seconds, not after minutes of exponential
    # back-off: the Load poll then puts it back in rotation.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
#: Opens a channel to a worker (address, options); the mesh's adds the secret and TLS.
OpenChannel = Callable[[str, list[tuple[str, Any]]], grpc.aio.Channel]


def plaintext_channel(address: str, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
    # Calls carry the request id on.
    return grpc.aio.insecure_channel(address, options=options, interceptors=client_interceptors())


def connect(address: str, role: str, open_channel: OpenChannel = plaintext_channel) -> Worker:
    channel = open_channel(address, CHANNEL_OPTIONS)
    return Worker(address, role, channel, STUBS[role](channel))


class Router:
    def __init__(
        self,
        prefill_addresses: list[str],
        decode_addresses: list[str],
        colocated_addresses: list[str] | None = None,
        max_imbalance_tokens: int = 4096,
        open_channel: OpenChannel = plaintext_channel,
    ) -> None:
        self.prefill = [connect(a, "prefill", open_channel) for a in prefill_addresses]
        self.decode = [connect(a, "decode", open_channel) for a in decode_addresses]
        self.colocated = [connect(a, "colocated", open_channel) for a in colocated_addresses or []]
        self.max_imbalance_tokens = max_imbalance_tokens
        self._open_channel = open_channel
        self._poller: LoadPoller | None = None
        #: The mesh's KV namespace, once the gateway has learned it from its workers; None
        #: checks nothing.
        self.namespace: str | None = None

    @property
    def is_colocated(self) -> bool:
        return bool(self.colocated)

    @property
    def workers(self) -> list[Worker]:
        return self.prefill + self.decode + self.colocated

    async def start(self) -> None:
        await self.refresh()
        self._poller = LoadPoller(
            [(w, w.address, STUBS[w.role]) for w in self.workers],
            lambda address: self._open_channel(address, CHANNEL_OPTIONS),
            self._apply,
            LOAD_POLL_S,
            LOAD_TIMEOUT_S,
        )
        self._poller.start()

    async def close(self) -> None:
        if self._poller:
            await self._poller.stop()
        for worker in self.workers:
            await worker.session.close()
            await worker.channel.close()

    async def refresh(self) -> None:
        """Polls every worker's Load once, on this loop (at start, and for tests)."""
        results = await asyncio.gather(*(ask_load(w.stub, LOAD_TIMEOUT_S) for w in self.workers))
        for worker, result in zip(self.workers, results, strict=True):
            self._apply(worker, result)

    def _apply(self, worker: Worker, result: PollResult) -> None:
        if isinstance(result, worker_pb.LoadReport):
            worker.load_answered(result)
            self.check_namespace(worker, result.namespace)
            return
        was_healthy = worker.healthy
        if worker.load_failed(result) and was_healthy:
            logger.warning("%s worker %s unreachable: %s", worker.role, worker.address, result)

    def check_namespace(self, worker: Worker, namespace: str) -> None:
        """Refuses ``worker`` while it serves another namespace than the mesh's; one log line
        when it is refused and one when it serves the mesh's again. An empty namespace (not
        reported) changes nothing."""
        if self.namespace is None or not namespace:
            return
        if namespace != self.namespace:
            if worker.refused != namespace:
                logger.error(
                    "refusing %s worker %s: it serves KV namespace %r, the mesh's is %r "
                    "(start it with the same model, --dtype and block size as the others)",
                    worker.role, worker.address, namespace, self.namespace,
                )  # fmt: skip
            worker.refused = namespace
        elif worker.refused is not None:
            logger.warning(
                "%s worker %s serves the mesh's KV namespace %r again: back in rotation",
                worker.role, worker.address, namespace,
            )  # fmt: skip
            worker.refused = None

    @staticmethod
    def _healthy(pool: list[Worker], exclude: set[Worker] | None = None) -> list[Worker]:
        healthy = [w for w in pool if w.routable and w not in (exclude or set())]
        if not healthy:
            role = pool[0].role if pool else "any"
            refused = sum(w.refused is not None for w in pool)
            why = f" ({refused} refused: another KV namespace)" if refused else ""
            raise WorkerUnavailableError(f"no healthy {role} worker{why}")
        return healthy

    def worker_states(self) -> dict[tuple[str, str], int]:
        """(role, state) -> how many workers are in it, every pair present (metrics)."""
        states = {
            (role, state): 0
            for role in STUBS
            for state in ("serving", "unreachable", "refused")
            if any(w.role == role for w in self.workers)
        }
        for worker in self.workers:
            states[(worker.role, worker.state)] += 1
        return states

    def pick_prompt_worker(
        self, hashes: Sequence[BlockHash], exclude: set[Worker] | None = None, priority: int = 0
    ) -> tuple[Worker, int]:
        """The prefill (or colocated) worker for a prompt with these block hashes, and how many
        of its leading blocks that worker is believed to hold."""
        pool = self.colocated or self.prefill
        candidates = self._healthy(pool, exclude)
        ahead = {w: w.ahead(priority)[1] for w in candidates}
        least = min(ahead.values())
        eligible = [w for w in candidates if ahead[w] <= least + self.max_imbalance_tokens]
        best = max(eligible, key=lambda w: (w.matched_blocks(hashes), -ahead[w], -w.routed_tokens))
        return best, best.matched_blocks(hashes)

    def pick_decode(self, priority: int = 0) -> Worker:
        return max(
            self._healthy(self.decode),
            key=lambda w: (w.decode_room(priority), -w.ahead(priority)[0]),
        )

    def serves_by_priority(self) -> bool:
        """Whether a worker in rotation runs the priority policy (else priorities would be
        ignored, and the gateway refuses them)."""
        return any(w.routable and w.serves_by_priority for w in self.workers)

    def mark_failed(self, worker: Worker) -> None:
        worker.healthy = False
