"""Lua scripts that make every store operation one atomic step inside Redis, read once from
``kvstore/lua/`` (``store/`` for the Redis store, ``lane/`` for the device lane's index).

Redis runs a script without interleaving any other command, so processes on many hosts can
pin, insert, move and evict without locks. Every script takes the namespace prefix as
ARGV[1] and builds its key names from it (so the store is not Redis-Cluster-safe: it wants
one Redis).

redis-py resends a command whose connection broke, so a script may run twice for one call:
each is written so a second run does no harm (pins are per owner and released together;
handles are a set; a put or promotion recognises payloads it already stored).

Block bytes never pass through a script's decisions: a client writes a copy where it must go
(DRAM plane, disk file) *before* the script that makes the copy visible, and frees the old
copy only after the script says nobody indexes it any more. A script that finds its copy
unneeded says so, and the client frees it.

Keys under ``<namespace>:``, with block hashes in hex:

- ``data:<hash>``       the block's DRAM payload (its bytes, or a shared-memory segment name);
                        its presence is the block's presence in DRAM.
- ``disk:<hash>``       the block's disk payload (a file name); a block is in one tier only.
- ``count``             hash: tier (``dram``, ``disk``) -> number of blocks in it.
- ``pins``              hash: block -> pins summed over owners; only pinned blocks appear.
- ``lru``, ``disk_lru`` sorted sets of the unpinned blocks of each tier, scored by when they
                        became unpinned or arrived (a ``clock`` counter, not wall time).
                        Every block is in exactly one of ``pins``, ``lru``, ``disk_lru``.
- ``owner:<o>:pins``    hash: block -> how often owner ``o`` pinned it.
- ``owner:<o>:order``   list: blocks in the order ``o`` first pinned them; release walks it
                        backwards so a request's tail is evicted before its shared prefix.
- ``owners``            set of owners holding pins (to find their keys when wiping).
- ``leases``            sorted set: owner -> lease deadline (ms of the Redis server's clock,
                        so hosts need no common clock). Every script that pins renews it;
                        every script that allocates first releases owners past their
                        deadline (their holder died or hung).
- ``events``            hash of counters: hits, misses, demotions, promotions, evictions,
                        expired_owners.
- ``config``            the namespace's capacities, leases and data plane, as text; every
                        handle must open it with the same.
- ``handles``           set of open handle ids; the last one to close wipes the namespace.
"""

from __future__ import annotations

import functools
from importlib import resources

PRELUDE = "_prelude.lua"


@functools.cache
def load_scripts(family: str) -> dict[str, str]:
    """The scripts of ``kvstore/lua/<family>/``, by file name without ``.lua``, each with
    that folder's ``_prelude.lua`` (its key names and helpers) in front. Read once a process."""
    folder = resources.files("kvstore").joinpath("lua", family)
    prelude = folder.joinpath(PRELUDE).read_text(encoding="utf-8")
    return {
        entry.name.removesuffix(".lua"): prelude + entry.read_text(encoding="utf-8")
        for entry in sorted(folder.iterdir(), key=lambda entry: entry.name)
        if entry.name.endswith(".lua") and entry.name != PRELUDE
    }


#: The Redis store's scripts (``kvstore/redis_store.py``), by operation.
SCRIPTS = load_scripts("store")
