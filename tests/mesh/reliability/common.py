"""What the reliability tests share: the shared mesh's limits and checks of its state."""

from __future__ import annotations

import time

import grpc

from pdmesh.v1 import generation_pb2 as gen_pb
from tests.mesh.harness import MeshThread, generate

#: The gateway's limit in the shared mesh: the overload test fills it exactly.
MAX_IN_FLIGHT = 8
MAX_REQUEST_BYTES = 64 << 10
SANITY_PROMPT = "The capital of France is"


def assert_serving_and_idle(mesh: MeshThread) -> None:
    """No block or pin left anywhere, no request in flight, and a greedy request still gets
    its right answer."""
    core = mesh.mesh.core
    assert core is not None
    deadline = time.monotonic() + 30
    while core.admission.num_in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert core.admission.num_in_flight == 0
    mesh.wait_idle()
    assert mesh.is_idle()
    reply = generate(
        mesh.stub, gen_pb.GenerateRequest(prompt=SANITY_PROMPT, max_tokens=4, temperature=0)
    )
    assert "Paris" in reply.text


def status_of(call: object) -> grpc.StatusCode:
    """The final status of a streaming call read to its end (OK when it ended normally)."""
    try:
        for _ in call:  # type: ignore[attr-defined]
            pass
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK
