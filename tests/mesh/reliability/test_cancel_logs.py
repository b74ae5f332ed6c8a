"""Ordinary client cancels are no errors: the issue saw each one log an ERROR traceback
(``ExecuteBatchError raised in core``). Cancels mid-stream, mid-prefill and right after
sending, with every log record of the process captured: none is ERROR, none holds a
traceback, and the mesh is left idle."""

from __future__ import annotations

import logging

import pytest

from pdmesh.v1 import generation_pb2 as gen_pb
from tests.mesh.harness import MeshThread
from tests.mesh.reliability.common import assert_serving_and_idle


def test_cancels_log_no_errors(shared_mesh: MeshThread, caplog: pytest.LogCaptureFixture) -> None:
    long_prompt = " ".join(f"line {i} reads {i * 13}" for i in range(120))
    with caplog.at_level(logging.INFO):
        for index in range(12):
            prompt = long_prompt if index % 3 == 1 else f"Tell me story {index}."
            request = gen_pb.GenerateRequest(prompt=prompt, max_tokens=200, ignore_eos=True)
            stream = shared_mesh.stub.Generate(request, timeout=120)
            if index % 3 == 0:
                next(stream)  # decoding
                next(stream)
            stream.cancel()  # index % 3 == 2: before anything came back
        assert_serving_and_idle(shared_mesh)
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]
