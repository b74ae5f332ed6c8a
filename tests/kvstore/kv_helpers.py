"""Helpers for the KV store tests: backends, blocks with known bytes, /dev/shm listings."""

from __future__ import annotations

import os
from collections.abc import Sequence

from kvstore.base import KVStore
from kvstore.block_hash import BlockHash, block_hash
from kvstore.shm import segment_prefix

SINGLE_TIER_BACKENDS = ("embedded", "redis", "redis+shm", "redis+p2p")
# DRAM above a small disk tier: the contract holds wherever eviction order is not observed.
TIERED_BACKENDS = ("embedded+disk", "redis+shm+disk")
BACKENDS = SINGLE_TIER_BACKENDS + TIERED_BACKENDS
REDIS_BACKENDS = ("redis", "redis+shm")
CONTRACT_DISK_BLOCKS = 3
_TEST_NAMESPACE = b"pdmesh-tests"


def store_spec(backend: str, redis_url: str) -> str:
    """The ``open_store`` spec of ``backend`` on the test Redis."""
    base, plus_disk, _ = backend.partition("+disk")
    spec = "embedded" if base == "embedded" else f"{base}://{redis_url.partition('://')[2]}"
    return f"{spec}?disk_blocks={CONTRACT_DISK_BLOCKS}" if plus_disk else spec


def chain_hashes(num_blocks: int, salt: str = "") -> list[BlockHash]:
    """Hashes of a chain of ``num_blocks`` blocks, like a prompt's; ``salt`` names the
    chain so different salts share no block."""
    hashes: list[BlockHash] = []
    for i in range(num_blocks):
        parent = hashes[-1] if hashes else None
        hashes.append(block_hash(parent, [i], _TEST_NAMESPACE + salt.encode()))
    return hashes


def block_data(hash_: BlockHash) -> bytes:
    """Bytes derived from the hash, so a reader can tell a block came back intact."""
    return hash_ * 5 + b"\x00kv"


def blocks(*hashes: BlockHash) -> list[tuple[BlockHash, bytes]]:
    return [(hash_, block_data(hash_)) for hash_ in hashes]


def present(store: KVStore, hashes: Sequence[BlockHash]) -> list[BlockHash]:
    """Which of ``hashes`` the store holds, in order (without pinning them)."""
    return [hash_ for hash_ in hashes if store.match_prefix([hash_]) == 1]


def shm_segments(namespace: str) -> list[str]:
    """Shared-memory segments of ``namespace`` that exist now."""
    prefix = segment_prefix(namespace)
    return sorted(name for name in os.listdir("/dev/shm") if name.startswith(prefix))


def shm_segment_hashes(namespace: str) -> set[str]:
    """Block hashes (hex) that have a segment in ``namespace``."""
    prefix = segment_prefix(namespace)
    return {name[len(prefix) :].split("_")[0] for name in shm_segments(namespace)}
