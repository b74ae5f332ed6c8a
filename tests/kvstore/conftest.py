"""Fixtures for the KV store tests: one real redis-server per session, and stores of every
backend, each test on its own namespace."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from kvstore.base import KVStore
from kvstore.factory import open_store
from tests.kvstore.kv_helpers import BACKENDS, store_spec
from tests.redis_server import start_redis, stop_redis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    proc, url = start_redis()
    try:
        yield url
    finally:
        stop_redis(proc)


@pytest.fixture
def namespace() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def spec(backend: str, request: pytest.FixtureRequest) -> str:
    """The store spec of ``backend``; starts Redis only for the backends that use it."""
    if backend.startswith("embedded"):
        return store_spec(backend, "")
    return store_spec(backend, request.getfixturevalue("redis_url"))


@pytest.fixture
def make_store(spec: str, namespace: str) -> Iterator[Callable[[int], KVStore]]:
    """Opens handles on this test's store (``make_store(capacity_blocks)``); closes them at
    the end of the test."""
    stores: list[KVStore] = []

    def make(capacity_blocks: int) -> KVStore:
        store = open_store(spec, capacity_blocks, namespace=namespace)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()
