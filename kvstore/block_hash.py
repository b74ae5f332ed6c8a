"""Block identity: a hash chain over token ids, so equal prefixes name equal blocks.

A block's hash covers its parent's hash, its own token ids and a namespace (model and cache
layout), so blocks of different models or layouts never collide. Stable across processes and
hosts (BLAKE2b, not Python's ``hash``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

BlockHash = bytes
#: Length of every block hash.
HASH_BYTES = 16


def block_hash(parent: BlockHash | None, token_ids: Sequence[int], namespace: bytes) -> BlockHash:
    digest = hashlib.blake2b(digest_size=HASH_BYTES, key=namespace[:64])
    digest.update(parent or b"\0" * 16)
    digest.update(b"".join(t.to_bytes(4, "little") for t in token_ids))
    return digest.digest()


def hash_full_blocks(
    token_ids: Sequence[int],
    block_size: int,
    namespace: bytes,
    known: Sequence[BlockHash] = (),
) -> list[BlockHash]:
    """Hashes of every full block of ``token_ids``; ``known`` are hashes already computed for
    the leading blocks and are reused, not recomputed."""
    hashes = list(known)
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hashes[-1] if hashes else None
        hashes.append(block_hash(parent, token_ids[start : start + block_size], namespace))
    return hashes
