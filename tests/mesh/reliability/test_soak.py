"""A soak, bounded in time (loopback only): clients keep the mesh busy with greedy requests
of random lengths and randomly cancel, abort or time some out. Every token any client
received is a prefix of the reference computed once by the engine; afterwards no block or
pin is left and the process's memory has not grown beyond a bound. Meanwhile a second tenant
on a connection of its own guesses the clients' ids (it knows their scheme): its Aborts of
them are unknown ids, and its own requests under those ids run beside theirs.

PDMESH_SOAK_SECONDS (default 30) sets the load phase's length."""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from typing import Any

import grpc
import psutil

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from pdmesh.v1 import generation_pb2 as gen_pb
from pdmesh.v1 import generation_pb2_grpc as gen_grpc
from tests.mesh.harness import MeshThread
from tests.mesh.reliability.common import MAX_IN_FLIGHT, assert_serving_and_idle

SOAK_SECONDS = float(os.environ.get("PDMESH_SOAK_SECONDS", "30"))
# Below the gateway's limit, so a refusal is a bug: a client that cancels starts its next
# request before the gateway has seen the cancel, so each thread (the clients and the other
# tenant) may hold two admissions for a moment.
NUM_CLIENTS = MAX_IN_FLIGHT // 2 - 1
MAX_NEW_TOKENS = 20
#: RSS may grow this much between the end of warm-up and the end (allocator slack, caches).
RSS_GROWTH_LIMIT = 200 << 20
PROMPTS = [
    "The capital of France is",
    "List three colours:",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Translate to French: good morning",
]
ACTIONS = ["complete", "cancel", "deadline", "abort"]


class Client:
    """One client thread's loop: a request, an action, a check of every token it got."""

    def __init__(self, mesh: MeshThread, references: list[list[int]], seed: int) -> None:
        self.mesh = mesh
        self.references = references
        self.rng = random.Random(seed)
        self.seed = seed
        self.outcomes: Counter[str] = Counter()
        self.failures: list[str] = []

    def run(self, stop_at: float) -> None:
        number = 0
        while time.monotonic() < stop_at:
            number += 1
            try:
                self._one(f"soak-{self.seed}-{number}")
            except Exception as error:  # collected: the test fails with every cause listed
                self.failures.append(f"{type(error).__name__}: {error}")

    def _one(self, request_id: str) -> None:
        index = self.rng.randrange(len(PROMPTS))
        max_tokens = self.rng.randint(1, MAX_NEW_TOKENS)
        action = self.rng.choices(ACTIONS, weights=[5, 2, 1, 2])[0]
        request = gen_pb.GenerateRequest(
            request_id=request_id,
            prompt=PROMPTS[index],
            max_tokens=max_tokens,
            temperature=0,
            ignore_eos=True,
        )
        timeout = self.rng.uniform(0.05, 1.0) if action == "deadline" else 120
        stream = self.mesh.stub.Generate(request, timeout=timeout)
        stop_after = self.rng.randint(0, 3)
        tokens, last = self._read(stream, action, stop_after, request_id)
        expected = self.references[index][:max_tokens]
        if tokens != expected[: len(tokens)]:
            self.failures.append(f"{request_id}: got {tokens}, expected a prefix of {expected}")
        if (
            last is not None
            and last.finish_reason == gen_pb.FINISH_REASON_ABORT
            and (action != "abort")
        ):
            self.failures.append(f"{request_id}: aborted by someone else")
        is_complete = last is not None and last.finish_reason == gen_pb.FINISH_REASON_LENGTH
        if is_complete and tokens != expected:
            self.failures.append(f"{request_id}: complete output {tokens} != {expected}")

    def _read(
        self, stream: Any, action: str, stop_after: int, request_id: str
    ) -> tuple[list[int], gen_pb.GenerateResponse | None]:
        tokens: list[int] = []
        last = None
        try:
            for count, piece in enumerate(stream):
                tokens.extend(piece.token_ids)
                last = piece
                if count == stop_after and action == "cancel":
                    stream.cancel()
                    self.outcomes["cancelled"] += 1
                    return tokens, None
                if count == stop_after and action == "abort":
                    self.mesh.stub.Abort(gen_pb.AbortRequest(request_id=request_id), timeout=30)
        except grpc.RpcError as error:
            code = error.code()
            if code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                self.failures.append(f"{request_id}: {code.name} {error.details()}")
            self.outcomes[code.name] += 1
            return tokens, None
        assert last is not None
        self.outcomes[gen_pb.FinishReason.Name(last.finish_reason)] += 1
        return tokens, last


class Intruder:
    """Another tenant (its own connection: a different caller) that aborts and reuses the
    ids the clients use right now."""

    def __init__(self, mesh: MeshThread) -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
        self.channel = grpc.insecure_channel(mesh.mesh.gateway_address, options=options)
        self.stub = gen_grpc.GenerationStub(self.channel)
        self.rng = random.Random(99)
        self.aborts = 0
        self.squats = 0
        self.failures: list[str] = []

    def run(self, stop_at: float) -> None:
        while time.monotonic() < stop_at:
            guess = f"soak-{self.rng.randrange(NUM_CLIENTS)}-{self.rng.randint(1, 40)}"
            try:
                answer = self.stub.Abort(gen_pb.AbortRequest(request_id=guess), timeout=30)
                self.aborts += 1
                if answer.aborted:
                    self.failures.append(f"aborted another caller's {guess}")
                if self.rng.random() < 0.2:  # its own request under the same id
                    request = gen_pb.GenerateRequest(request_id=guess, prompt="Hi", max_tokens=2)
                    self.stub.GenerateUnary(request, timeout=120)
                    self.squats += 1
            except grpc.RpcError as error:
                self.failures.append(f"{guess}: {error.code().name} {error.details()}")
            time.sleep(0.01)
        self.channel.close()


def test_soak_under_concurrent_load_with_cancellations(
    shared_mesh: MeshThread, smol_llm: LLM
) -> None:
    greedy = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0, ignore_eos=True)
    references = [out.token_ids for out in smol_llm.generate(PROMPTS, greedy)]
    process = psutil.Process()
    clients = [Client(shared_mesh, references, seed) for seed in range(NUM_CLIENTS)]
    intruder = Intruder(shared_mesh)
    start = time.monotonic()
    stop_at = start + SOAK_SECONDS
    threads = [threading.Thread(target=c.run, args=(stop_at,)) for c in [*clients, intruder]]
    for thread in threads:
        thread.start()
    time.sleep(SOAK_SECONDS / 4)  # warm-up: every code path has run and allocated
    rss_warm = process.memory_info().rss
    for thread in threads:
        thread.join(timeout=SOAK_SECONDS + 300)
        assert not thread.is_alive(), "a client hung"
    elapsed = time.monotonic() - start
    outcomes = sum((c.outcomes for c in clients), Counter())
    failures = [f for c in [*clients, intruder] for f in c.failures]
    assert not failures, failures[:10]
    assert intruder.aborts > 0 and intruder.squats > 0
    assert_serving_and_idle(shared_mesh)
    rss_end = process.memory_info().rss
    total = sum(outcomes.values())
    print(
        f"soak: {total} requests in {elapsed:.0f} s ({total / elapsed:.1f}/s) by "
        f"{NUM_CLIENTS} clients: {dict(outcomes)}; RSS {rss_warm >> 20} -> {rss_end >> 20} MiB; "
        f"the other tenant: {intruder.aborts} Aborts of guessed ids, {intruder.squats} requests "
        "under them"
    )
    assert outcomes["FINISH_REASON_LENGTH"] > 0 and outcomes["cancelled"] > 0
    assert outcomes["FINISH_REASON_ABORT"] + outcomes["DEADLINE_EXCEEDED"] > 0
    assert rss_end - rss_warm < RSS_GROWTH_LIMIT
