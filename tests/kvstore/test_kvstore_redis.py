"""What only the Redis-backed store has: several handles on one namespace, the namespace's
lifetime, and block bytes in shared memory that outlive the process that wrote them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from kvstore.base import StoreStats
from kvstore.data_planes import DataPlaneKind
from kvstore.errors import StoreFullError
from kvstore.factory import open_store
from kvstore.redis_store import RedisKVStore
from tests.kvstore.kv_helpers import (
    REDIS_BACKENDS,
    block_data,
    blocks,
    chain_hashes,
    present,
    shm_segment_hashes,
    shm_segments,
    store_spec,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=REDIS_BACKENDS)
def redis_spec(request: pytest.FixtureRequest, redis_url: str) -> str:
    return store_spec(str(request.param), redis_url)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def _keys(client: redis.Redis, namespace: str) -> list[str]:
    return sorted(str(key) for key in client.keys(f"{namespace}:*"))


def test_handles_on_one_namespace_share_blocks_and_pins(redis_spec: str, namespace: str) -> None:
    writer = open_store(redis_spec, 4, namespace=namespace)
    reader = open_store(redis_spec, 4, namespace=namespace)
    a, b = chain_hashes(2)
    writer.put("req-1", blocks(a, b))
    assert reader.match_prefix([a, b]) == 2
    assert reader.get("req-2", [b]) == [block_data(b)]
    writer.release("req-2")  # any handle may release any owner
    writer.release("req-1")
    assert reader.stats() == StoreStats(num_blocks=2, num_pinned_blocks=0, capacity_blocks=4)
    reader.close()
    writer.close()


def test_namespaces_are_isolated(redis_url: str, namespace: str) -> None:
    spec = store_spec("redis", redis_url)
    first = open_store(spec, 4, namespace=namespace)
    second = open_store(spec, 4, namespace=f"{namespace}-other")
    (a,) = chain_hashes(1)
    first.put("req", blocks(a))
    assert second.match_prefix([a]) == 0
    assert second.stats().num_blocks == 0
    first.close()
    second.close()


def test_handles_must_agree_on_capacity_and_data_plane(redis_url: str, namespace: str) -> None:
    store = RedisKVStore(redis_url, 4, namespace=namespace, data_plane="shm")
    with pytest.raises(ValueError, match="has capacity_blocks=4 data_plane=shm"):
        RedisKVStore(redis_url, 8, namespace=namespace, data_plane="shm")
    with pytest.raises(ValueError, match="asks for capacity_blocks=4 data_plane=redis"):
        RedisKVStore(redis_url, 4, namespace=namespace, data_plane="redis")
    store.close()
    # The namespace is gone with its last handle, and its config with it.
    RedisKVStore(redis_url, 8, namespace=namespace, data_plane="redis").close()


def test_the_last_close_wipes_the_namespace(
    redis_spec: str, namespace: str, client: redis.Redis
) -> None:
    first = open_store(redis_spec, 4, namespace=namespace)
    second = open_store(redis_spec, 4, namespace=namespace)
    a, b = chain_hashes(2)
    first.put("req", blocks(a, b))
    first.close()
    first.close()  # idempotent: must not count as a second handle closing
    assert second.get("req-2", [a]) == [block_data(a)]
    second.close()
    assert _keys(client, namespace) == []
    assert shm_segments(namespace) == []


def test_a_closed_handle_refuses_work(redis_spec: str, namespace: str) -> None:
    store = open_store(redis_spec, 4, namespace=namespace)
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.put("req", blocks(*chain_hashes(1)))


@pytest.mark.parametrize("data_plane", ["redis", "shm"])
def test_clear_drops_every_block_but_keeps_the_handles(
    redis_url: str, namespace: str, data_plane: DataPlaneKind, client: redis.Redis
) -> None:
    store = RedisKVStore(redis_url, 4, namespace=namespace, data_plane=data_plane)
    store.put("req", blocks(*chain_hashes(3)))
    store.clear()
    assert store.stats() == StoreStats(num_blocks=0, num_pinned_blocks=0, capacity_blocks=4)
    kept = [f"{namespace}:{key}" for key in ("config", "handles")]
    assert _keys(client, namespace) == kept
    assert shm_segments(namespace) == []
    store.put("req", blocks(*chain_hashes(4)))  # the whole capacity is free again
    store.close()


def test_shm_keeps_one_segment_per_block_and_unlinks_evicted_ones(
    redis_url: str, namespace: str
) -> None:
    store = open_store(store_spec("redis+shm", redis_url), 2, namespace=namespace)
    a, b = chain_hashes(2)
    (c,) = chain_hashes(1, salt="other")
    store.put("req-1", blocks(a, b))
    assert shm_segment_hashes(namespace) == {a.hex(), b.hex()}
    store.release("req-1")  # evictable: b, then a
    store.put("req-2", blocks(c))
    assert shm_segment_hashes(namespace) == {a.hex(), c.hex()}
    store.close()
    assert shm_segments(namespace) == []


def test_shm_full_put_leaves_no_segment_behind(redis_url: str, namespace: str) -> None:
    store = open_store(store_spec("redis+shm", redis_url), 1, namespace=namespace)
    (a,) = chain_hashes(1)
    (b,) = chain_hashes(1, salt="other")
    store.put("req-1", blocks(a))
    with pytest.raises(StoreFullError):
        store.put("req-2", blocks(b))
    assert shm_segment_hashes(namespace) == {a.hex()}
    store.close()


def test_shm_blocks_outlive_their_writer_process_without_tracker_noise(
    redis_url: str, namespace: str
) -> None:
    """Python's resource tracker would unlink a segment when the process that made it exits,
    and warn about a leak; the store owns its segments, so neither may happen."""
    spec = store_spec("redis+shm", redis_url)
    store = open_store(spec, 4, namespace=namespace)
    a, b = chain_hashes(2)
    writer = textwrap.dedent(
        f"""
        from kvstore.factory import open_store
        from tests.kvstore.kv_helpers import blocks, chain_hashes

        store = open_store({spec!r}, 4, namespace={namespace!r})
        store.put("writer", blocks(*chain_hashes(2)))
        assert len(store.get("reader", chain_hashes(2))) == 2
        store.release("reader")
        store.close()
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", writer],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONWARNINGS": "always"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert store.get("reader", [a, b]) == [block_data(a), block_data(b)]
    assert present(store, [a, b]) == [a, b]
    store.close()
    assert shm_segments(namespace) == []


def test_a_rerun_put_keeps_the_segments_its_first_run_indexed(
    redis_url: str, namespace: str
) -> None:
    """redis-py resends a script whose reply a broken connection lost; the rerun must still
    report the segments the first run indexed, or put would unlink them."""
    store = RedisKVStore(redis_url, 4, namespace=namespace, data_plane="shm")
    (a,) = chain_hashes(1)
    data_by_hex = {a.hex(): block_data(a)}
    written: dict[str, bytes] = {}
    first_run, *_ = store._commit_put("req", blocks(a), data_by_hex, written, {})
    rerun, *_ = store._commit_put("req", blocks(a), data_by_hex, written, {})
    assert first_run == rerun == {a.hex()}
    assert store.get("reader", [a]) == [block_data(a)]
    store.close()
    assert shm_segments(namespace) == []
