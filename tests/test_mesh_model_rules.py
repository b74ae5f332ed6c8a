"""The gateway's rules for its workers' models, on exact values: which namespace a mesh
adopts from its workers' answers, which workers it refuses (one log line each time one is
refused, naming both namespaces), and which engine flags of its own disagree."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from gateway.mesh_model import DeclaredModel, MeshModel, choose
from gateway.router import Router, Worker
from pdmesh.v1 import worker_pb2 as worker_pb
from serving.rpc import WorkerUnavailableError

BF16 = "smol.gguf|llama|30|3|64|bfloat16|16"
FP32 = "smol.gguf|llama|30|3|64|float32|16"


def _model(namespace: str, dtype: str = "bfloat16", max_model_len: int = 8192) -> MeshModel:
    return MeshModel(namespace, "smol.gguf", "/m/smol.gguf", dtype, 16, max_model_len, 49152)


def _worker(address: str) -> Worker:
    none: Any = None  # no call is made
    return Worker(address, "decode", none, none)


def test_the_namespace_most_workers_answer_wins_and_the_first_on_a_tie() -> None:
    assert choose([None, None]) is None
    assert choose([None, _model(FP32), _model(BF16), _model(BF16)]) == _model(BF16)
    assert choose([_model(FP32), None, _model(BF16)]) == _model(FP32)


def test_a_worker_of_another_namespace_is_refused_once_and_taken_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    router = Router([], [])
    good, odd = _worker("h:1"), _worker("h:2")
    router.check_namespace(odd, FP32)  # nothing is checked before the mesh knows its own
    assert odd.routable
    router.namespace = BF16
    with caplog.at_level(logging.WARNING, "gateway.router"):
        for _ in range(3):  # every poll checks; only the first refusal is logged
            router._apply(odd, worker_pb.LoadReport(num_free_blocks=99, namespace=FP32))
            router._apply(good, worker_pb.LoadReport(num_free_blocks=5, namespace=BF16))
    refusals = [r.getMessage() for r in caplog.records if "refusing" in r.getMessage()]
    assert len(refusals) == 1 and "h:2" in refusals[0]
    assert repr(FP32) in refusals[0] and repr(BF16) in refusals[0]
    assert (odd.state, good.state) == ("refused", "serving")
    assert Router._healthy([good, odd]) == [good]  # most free blocks, but never picked
    with pytest.raises(WorkerUnavailableError, match="1 refused: another KV namespace"):
        Router._healthy([odd])
    router._apply(odd, worker_pb.LoadReport(namespace=BF16))  # restarted with the right flags
    assert odd.routable and odd.refused is None


def test_only_gateway_flags_that_disagree_are_reported() -> None:
    mesh = _model(BF16)
    assert DeclaredModel().check(mesh) == []
    assert DeclaredModel("/elsewhere/smol.gguf", "auto", 8192).check(mesh) == []
    lines = DeclaredModel("other.gguf", "float32", 2048).check(mesh)
    assert lines == [
        "--model 'other.gguf' but the workers serve 'smol.gguf'",
        "--dtype float32 but the workers run bfloat16",
        "--max-model-len 2048 but the workers accept 8192",
    ]
