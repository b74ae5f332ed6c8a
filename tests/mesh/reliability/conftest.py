"""One small mesh shared by the reliability tests of this package (validation, overload,
fuzz, soak): the model loads once for all of them and is freed after the last one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engine.config import EngineConfig, SchedulerConfig
from pdmesh.limits import ServingLimits
from pdmesh.mesh import MeshConfig
from tests.mesh.harness import MeshThread
from tests.mesh.reliability.common import MAX_IN_FLIGHT, MAX_REQUEST_BYTES


@pytest.fixture(scope="package")
def shared_mesh() -> Iterator[MeshThread]:
    """1 prefill + 1 decode worker, embedded store, small overload and size limits."""
    limits = ServingLimits(
        max_in_flight=MAX_IN_FLIGHT, max_request_bytes=MAX_REQUEST_BYTES, drain_timeout_s=5
    )
    config = MeshConfig(
        # Short prefill chunks (as the issue asks of CPU budgets): a cancelled prompt's
        # chunk in flight is the only work it may still cost.
        engine=EngineConfig(device="cpu", scheduler=SchedulerConfig(max_num_batched_tokens=512)),
        gateway_port=0, num_prefill=1, num_decode=1,
        limits=limits,
    )  # fmt: skip
    harness = MeshThread(config)
    yield harness
    harness.close()
