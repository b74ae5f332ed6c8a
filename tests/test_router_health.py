"""The router's reading of Load polls: a slow answer is not a dead worker (the issue's
finding: a busy gateway timed out its polls and took healthy workers out of rotation); a
refused or out-of-service answer is, at once; one answer brings it back."""

from __future__ import annotations

from typing import Any

import grpc

from gateway.router import SLOW_POLLS_TOLERATED, Worker
from pdmesh.v1 import worker_pb2 as worker_pb


def _worker() -> Worker:
    none: Any = None  # no call is made: the polls' outcomes are given
    return Worker("127.0.0.1:1", "decode", none, none)


def test_timeouts_in_a_row_below_the_tolerance_keep_the_worker() -> None:
    worker = _worker()
    for _ in range(SLOW_POLLS_TOLERATED - 1):
        assert not worker.load_failed(grpc.StatusCode.DEADLINE_EXCEEDED)
        assert worker.healthy
    worker.load_answered(worker_pb.LoadReport(num_free_blocks=7))
    assert worker.slow_polls == 0 and worker.free_blocks == 7
    for _ in range(SLOW_POLLS_TOLERATED - 1):  # the count starts over after an answer
        assert not worker.load_failed(grpc.StatusCode.DEADLINE_EXCEEDED)
    assert worker.load_failed(grpc.StatusCode.DEADLINE_EXCEEDED)
    assert not worker.healthy


def test_a_refused_or_out_of_service_poll_takes_it_out_at_once() -> None:
    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED):
        worker = _worker()
        assert worker.load_failed(code) and not worker.healthy
        worker.load_answered(worker_pb.LoadReport())
        assert worker.healthy
