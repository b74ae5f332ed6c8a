"""``open_store`` turns a spec string into the right store and data plane."""

from __future__ import annotations

import pytest

from kvstore.data_planes import RedisValuePlane, SharedMemoryPlane
from kvstore.embedded import EmbeddedKVStore
from kvstore.factory import open_store
from kvstore.redis_store import RedisKVStore
from tests.kvstore.kv_helpers import blocks, chain_hashes


def test_embedded() -> None:
    store = open_store("embedded", 3)
    assert isinstance(store, EmbeddedKVStore)
    assert store.stats().capacity_blocks == 3


@pytest.mark.parametrize(
    ("scheme", "plane_type"), [("redis", RedisValuePlane), ("redis+shm", SharedMemoryPlane)]
)
def test_redis_specs_pick_the_data_plane(
    scheme: str, plane_type: type, redis_url: str, namespace: str
) -> None:
    host_port_db = redis_url.partition("://")[2]
    store = open_store(f"{scheme}://{host_port_db}", 3, namespace=namespace)
    assert isinstance(store, RedisKVStore)
    assert isinstance(store._plane, plane_type)
    store.put("req", blocks(*chain_hashes(2)))
    assert store.stats().num_blocks == 2
    store.close()


@pytest.mark.parametrize("spec", ["", "memory", "redis", "http://localhost:6379/0", "shm://x"])
def test_unknown_specs_are_rejected(spec: str) -> None:
    with pytest.raises(ValueError, match="unknown KV store spec"):
        open_store(spec, 3)
