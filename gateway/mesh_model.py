"""The mesh's model, KV namespace and limits, as its workers report them.

The gateway runs no engine: a namespace derived from its own flags would name prompt blocks
differently from workers started with another dtype or block size, and every request would
fail at the hand-off as if the client had sent bad input. So the gateway asks its workers
(``WorkerInfo``) and adopts what they serve; engine flags it still accepts are only checked
against that, with a warning when they disagree. A worker whose namespace is not the mesh's
is refused by the router (``gateway.router``), never routed to.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from engine.model_source import ModelNotFoundError, ModelSource, resolve_model
from gateway.router import Router
from pdmesh.v1 import worker_pb2 as worker_pb

logger = logging.getLogger(__name__)

INFO_TIMEOUT_S = 2.0
#: How often the gateway asks again while no worker has answered, and how often it says so.
RETRY_S = 0.5
WAITING_LOG_S = 30.0


@dataclass(frozen=True)
class MeshModel:
    """What the mesh's workers serve (``WorkerInfo``), as the gateway uses it."""

    namespace: str
    model_name: str
    model_path: str
    dtype: str
    block_size: int
    max_model_len: int
    vocab_size: int

    def __post_init__(self) -> None:
        if not self.namespace or self.block_size <= 0 or self.max_model_len <= 0:
            raise ValueError(f"a worker reported an incomplete model description: {self}")

    @classmethod
    def from_pb(cls, info: worker_pb.WorkerInfo) -> MeshModel:
        return cls(
            info.namespace, info.model_name, info.model_path, info.dtype,
            info.block_size, info.max_model_len, info.vocab_size,
        )  # fmt: skip


@dataclass(frozen=True)
class DeclaredModel:
    """Engine flags given to the gateway itself (None: not given). They never override the
    workers: one that disagrees is logged, naming both values, and the workers' is used."""

    model: str | None = None
    dtype: str | None = None
    max_model_len: int | None = None

    def check(self, mesh: MeshModel) -> list[str]:
        """One line per flag that disagrees with the workers (each is also logged)."""
        lines = []
        if self.model is not None and Path(self.model).expanduser().name != mesh.model_name:
            lines.append(f"--model {self.model!r} but the workers serve {mesh.model_name!r}")
        if self.dtype not in (None, "auto", mesh.dtype):
            lines.append(f"--dtype {self.dtype} but the workers run {mesh.dtype}")
        if self.max_model_len not in (None, mesh.max_model_len):
            lines.append(
                f"--max-model-len {self.max_model_len} but the workers accept {mesh.max_model_len}"
            )
        for line in lines:
            logger.warning("gateway flag ignored: %s; using the workers' value", line)
        return lines


async def ask_info(stub: Any, timeout_s: float = INFO_TIMEOUT_S) -> MeshModel | None:
    """The worker's model, or None when it does not answer (yet)."""
    try:
        info = await stub.Info(worker_pb.WorkerInfoRequest(), timeout=timeout_s)
    except grpc.aio.AioRpcError:
        return None
    return MeshModel.from_pb(info)


def choose(answers: Sequence[MeshModel | None]) -> MeshModel | None:
    """The mesh's model among the workers' answers: the namespace most of them serve, the
    first worker's (in address order) on a tie. None when nobody answered."""
    given = [answer for answer in answers if answer is not None]
    if not given:
        return None
    counts = Counter(answer.namespace for answer in given)
    most = max(counts.values())
    return next(answer for answer in given if counts[answer.namespace] == most)


async def discover(stubs: Sequence[Any]) -> tuple[MeshModel, list[MeshModel | None]]:
    """Waits until a worker answers; the mesh's model and every worker's answer (in order)."""
    last_log = time.monotonic()
    logged = False
    while True:
        answers = list(await asyncio.gather(*(ask_info(stub) for stub in stubs)))
        chosen = choose(answers)
        if chosen is not None:
            return chosen, answers
        if not logged or time.monotonic() - last_log >= WAITING_LOG_S:
            logger.warning("no worker answers yet; waiting to learn the mesh's model from one")
            logged, last_log = True, time.monotonic()
        await asyncio.sleep(RETRY_S)


async def adopt(router: Router, declared: DeclaredModel) -> MeshModel:
    """Learns the mesh's model from the router's workers and refuses, at once, those that
    answered with another namespace (the Load polls keep checking every worker after)."""
    model, answers = await discover([worker.stub for worker in router.workers])
    router.namespace = model.namespace
    for worker, answer in zip(router.workers, answers, strict=True):
        if answer is None:
            continue
        router.check_namespace(worker, answer.namespace)
        if answer.namespace == model.namespace and answer.max_model_len != model.max_model_len:
            logger.warning(
                "%s worker %s accepts %d tokens, the mesh %d: longer requests fail there",
                worker.role, worker.address, answer.max_model_len, model.max_model_len,
            )  # fmt: skip
    declared.check(model)
    logger.info(
        "the mesh serves %s (%s, max_model_len %d; KV namespace %r), as its workers report",
        model.model_name, model.dtype, model.max_model_len, model.namespace,
    )  # fmt: skip
    return model


def tokenizer_source(model: MeshModel, declared: DeclaredModel) -> ModelSource:
    """Where the gateway reads the tokenizer: the workers' model path, or on a host where
    that path does not exist, the gateway's own ``--model``."""
    path = Path(model.model_path)
    if path.exists():
        return resolve_model(str(path))
    if declared.model is not None:
        logger.warning(
            "the workers' model %s is not on this host; reading the tokenizer of --model %s",
            path, declared.model,
        )  # fmt: skip
        return resolve_model(declared.model)
    raise ModelNotFoundError(
        f"the workers load their model from {path}, which this host lacks: give the gateway "
        "--model with a copy of it (its tokenizer is read there)"
    )
