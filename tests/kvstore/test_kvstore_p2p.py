"""The peer-to-peer data plane: a handle on another host pulls block bytes from the writer's
block server over gRPC, disk blocks included, and frees them there on eviction. Two handles
that name this machine differently (127.0.0.1 and localhost) are two hosts to each other."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from kvstore.factory import open_store
from kvstore.redis_store import RedisKVStore
from tests.kvstore.kv_helpers import block_data, blocks, chain_hashes, shm_segments, store_spec
from tests.kvstore.kv_workers import TIMEOUT_S, put_and_hang


def _open_host(
    redis_url: str, namespace: str, host: str, disk_blocks: int, tmp_path: Path
) -> RedisKVStore:
    """A handle as if on host ``host``, with its own disk."""
    base = store_spec("redis", redis_url).replace("redis://", "redis+p2p://")
    query = f"peer_host={host}&disk_blocks={disk_blocks}&disk_dir={tmp_path / host}"
    store = open_store(f"{base}?{query}", 2, namespace=namespace)
    assert isinstance(store, RedisKVStore)
    return store


def test_a_reader_on_another_host_pulls_dram_and_disk_blocks_from_the_writer(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    writer = _open_host(redis_url, namespace, "127.0.0.1", 2, tmp_path)
    reader = _open_host(redis_url, namespace, "localhost", 2, tmp_path)
    assert writer.peer_address != reader.peer_address
    a, b, c = chain_hashes(3)
    big = bytes(range(256)) * 12_000  # 3 MB: several 1 MiB chunks
    writer.put("w1", [(a, big), *blocks(b)])
    writer.release("w1")
    writer.put("w2", blocks(c))  # b moves down to the writer's disk
    assert [writer.locate(h) for h in (a, b, c)] == ["dram", "disk", "dram"]

    assert reader.get("r", [a, c]) == [big, block_data(c)]
    remote = len(big) + len(block_data(c))
    assert reader.metrics().bytes_moved["p2p_remote_read"] == remote
    writer.release("w2")
    reader.release("r")  # DRAM queue: c, a
    # b comes up into the reader's shared memory; the writer's file is freed through its
    # server, and c (the oldest unpinned) swaps down to the reader's disk.
    assert reader.get("r", [b]) == [block_data(b)]
    # Pulled: b, and c again (its DRAM bytes are the writer's) for its copy on the disk here.
    pulled = remote + len(block_data(b)) + len(block_data(c))
    assert reader.metrics().bytes_moved["p2p_remote_read"] == pulled
    assert writer.disk_files() == [] and len(reader.disk_files()) == 1
    assert writer.get("w3", [b]) == [block_data(b)]  # and back the other way
    assert "p2p_remote_read" in writer.metrics().bytes_moved
    for owner in ("r", "w3"):
        reader.release(owner)
    assert reader.stats().num_pinned_blocks == 0
    reader.close()
    writer.close()
    assert shm_segments(namespace) == []
    assert writer.disk_files() == reader.disk_files() == []


def test_a_closing_peer_takes_its_blocks_out_of_the_index(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    writer = _open_host(redis_url, namespace, "127.0.0.1", 2, tmp_path)
    reader = _open_host(redis_url, namespace, "localhost", 2, tmp_path)
    a, b = chain_hashes(2)
    writer.put("w", blocks(a))
    reader.put("r", blocks(b))
    writer.close()  # nobody could reach a through the stopped server: a leaves the index
    assert reader.match_prefix([a]) == 0 and reader.match_prefix([b]) == 1
    assert reader.metrics().tier("dram").num_blocks == 1
    reader.release("w")
    reader.release("r")
    reader.close()
    assert shm_segments(namespace) == []


def test_blocks_of_a_crashed_peer_read_as_missing_and_sweep_frees_them(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    spec = f"{store_spec('redis', redis_url).replace('redis://', 'redis+p2p://')}"
    spec += f"?peer_host=localhost&disk_dir={tmp_path / 'crashed'}"
    reader = _open_host(redis_url, namespace, "127.0.0.1", 0, tmp_path)
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    host = ctx.Process(target=put_and_hang, args=(spec, 2, namespace, "crashed", ready))
    host.start()
    assert ready.wait(TIMEOUT_S)
    host.kill()
    host.join(TIMEOUT_S)
    a, b = chain_hashes(2, salt="crashed")
    assert reader.match_prefix([a, b]) == 2  # the index still names them...
    with pytest.raises(KeyError, match="unreachable or gone"):
        reader.get("r", [a])  # ...but their host is gone
    reader.release("r")
    reader.clear()  # frees nothing on the dead host: its segments are orphans now
    assert len(shm_segments(namespace)) == 2
    assert reader.sweep_orphans(min_age_s=0) == 2  # this machine's /dev/shm holds them
    reader.close()
    assert shm_segments(namespace) == []
