"""A mesh for a benchmark to drive: started in this process on its own event-loop thread (so
the load generator's loop stays its own), or an address given by the user."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pdmesh.mesh import Mesh, MeshConfig


class MeshInThread:
    def __init__(self, config: MeshConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.mesh = Mesh(config)
        asyncio.run_coroutine_threadsafe(self.mesh.start(), self.loop).result(600)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.mesh.stop(), self.loop).result(120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@contextmanager
def serving(target: str | None, config: MeshConfig) -> Iterator[str]:
    """``target`` when given; otherwise the gateway address of a mesh started for the run."""
    if target:
        yield target
        return
    mesh = MeshInThread(config)
    try:
        yield mesh.mesh.gateway_address
    finally:
        mesh.close()


def recorded_config(config: MeshConfig) -> dict[str, Any]:
    """The mesh's layout for a results file: everything but its security settings, which
    hold keys and the secret (never written anywhere)."""
    layout = dataclasses.asdict(config)
    del layout["security"]
    return layout
