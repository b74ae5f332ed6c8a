"""A worker that goes away is taken out of rotation: prefill requests are retried elsewhere,
requests that need a missing decode worker fail with UNAVAILABLE, and nothing hangs."""

from __future__ import annotations

import grpc

from engine.config import EngineConfig
from pdmesh.mesh import MeshConfig
from tests.mesh.harness import MeshThread, generate
from tests.mesh.test_mesh_e2e import to_request


def test_dead_workers_are_routed_around_or_reported() -> None:
    harness = MeshThread(
        MeshConfig(engine=EngineConfig(device="cpu"), gateway_port=0, num_prefill=2, num_decode=1)
    )
    try:
        core = harness.mesh.core
        assert core is not None
        first_prefill = harness.mesh.workers[0]
        harness.run(first_prefill.server.stop(0))
        # The router still believes the stopped worker healthy until a call or a Load fails:
        # every request must succeed anyway, through the retry.
        for index in range(4):
            reply = generate(harness.stub, to_request(f"Say {index}.", max_tokens=3, temperature=0))
            assert len(reply.token_ids) == 3
        assert not core.router.prefill[0].healthy and core.router.prefill[1].healthy
        decode = next(w for w in harness.mesh.workers if w.role == "decode")
        harness.run(decode.server.stop(0))
        try:
            generate(harness.stub, to_request("Hello", max_tokens=3))
            raise AssertionError("expected UNAVAILABLE")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert harness.mesh.store.stats().num_pinned_blocks == 0
    finally:
        harness.close()
