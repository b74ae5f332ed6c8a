"""A mesh for a benchmark to drive: started for the run as ``pdmesh up`` starts one (every
service a process of its own, never the load generator's), or an address given by the user."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pdmesh.cluster import LocalCluster
from pdmesh.mesh import MeshConfig


@contextmanager
def serving(target: str | None, config: MeshConfig) -> Iterator[str]:
    """``target`` when given; otherwise the gateway address of a mesh started for the run."""
    if target:
        yield target
        return
    cluster = LocalCluster(config)
    cluster.start()
    try:
        yield cluster.gateway_address
    finally:
        cluster.stop()


def recorded_config(config: MeshConfig) -> dict[str, Any]:
    """The mesh's layout for a results file: everything but its security settings, which
    hold keys and the secret (never written anywhere)."""
    layout = dataclasses.asdict(config)
    del layout["security"]
    return layout
