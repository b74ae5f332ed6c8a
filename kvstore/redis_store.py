"""The KV store shared by processes on many hosts: index in Redis, bytes in a data plane.

Each operation is one Lua script (``kvstore.redis_scripts``), so pins, inserts and evictions
from different processes never interleave. Block bytes go to the data plane *before* the
script that makes them visible runs, so a reader never sees a half-written block; a pinned
block is never evicted, so a reader's bytes cannot vanish while it copies them.

The namespace lives as long as some handle is open: the last ``close`` wipes its keys and
unlinks its shared-memory segments. A process that dies without closing leaves its handle
registered (``<namespace>:handles`` names host and pid) and the namespace is then never
wiped by a close; ``clear`` drops its blocks explicitly (call it when no request is in
flight, e.g. at cluster start).

The Redis must keep every key it is given (``maxmemory-policy noeviction``, its default):
the store does its own eviction, and a key Redis dropped on its own would corrupt the index.

If a put's connection breaks for good after Redis committed it, the put frees the segments
it wrote although the index names them; readers of those blocks get ``KeyError``, as for
any missing block.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from typing import Any, TypeVar

import redis

from kvstore import redis_scripts
from kvstore.base import KVStore, StoreStats
from kvstore.block_hash import BlockHash
from kvstore.data_planes import DataPlane, DataPlaneKind, make_data_plane
from kvstore.errors import StoreFullError, StoreUnavailableError

F = TypeVar("F", bound=Callable[..., Any])


def _reachable(method: F) -> F:
    """Redis connection failures become ``StoreUnavailableError`` (UNAVAILABLE to a caller);
    redis-py reconnects on the next call once the server answers again."""

    @functools.wraps(method)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as error:
            raise StoreUnavailableError(f"Redis: {error}") from error

    return wrapped  # type: ignore[return-value]


class RedisKVStore(KVStore):
    """A handle on the store named ``namespace`` in the Redis at ``url``.

    ``data_plane="redis"`` keeps block bytes in Redis (any host); ``"shm"`` keeps them in
    POSIX shared memory (processes on the Redis index's host, or at least all on one host).
    Every handle of a namespace must use the same data plane and capacity.
    """

    def __init__(
        self,
        url: str,
        capacity_blocks: int,
        namespace: str = "pdmesh",
        data_plane: DataPlaneKind = "redis",
    ) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be at least 1, got {capacity_blocks}")
        self._capacity_blocks = capacity_blocks
        self._prefix = f"{namespace}:"
        self._plane: DataPlane = make_data_plane(data_plane, namespace)
        self._client = redis.Redis.from_url(url)
        self._scripts = {
            name: self._client.register_script(body) for name, body in redis_scripts.SCRIPTS.items()
        }
        # What every handle of the namespace must agree on, checked when it opens.
        self._config = f"capacity_blocks={capacity_blocks} data_plane={data_plane}"
        self._handle_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._close_lock = threading.Lock()
        self._is_closed = False
        self._register_handle()

    @_reachable
    def put(self, owner: str, blocks: Sequence[tuple[BlockHash, bytes]]) -> None:
        self._check_open()
        if not blocks:
            return
        data_by_hex: dict[str, bytes] = {}
        for block_hash, data in blocks:
            data_by_hex.setdefault(block_hash.hex(), data)
        written: dict[str, bytes] = {}  # block hex -> payload this call wrote
        indexed: set[str] = set()
        try:
            indexed, evicted = self._commit_put(owner, blocks, data_by_hex, written)
        finally:
            # Payloads of blocks another process stored first, or of a failed put.
            self._plane.discard(p for h, p in written.items() if h not in indexed)
        self._plane.discard(evicted)

    @_reachable
    def match_prefix(self, hashes: Sequence[BlockHash]) -> int:
        self._check_open()
        if not hashes:
            return 0
        return int(self._run("match_prefix", self._prefix, *_hexes(hashes)))

    @_reachable
    def get(self, owner: str, hashes: Sequence[BlockHash]) -> list[bytes]:
        """Pins, then reads; if a shared-memory segment turns out to be gone, the pins this
        call took stay with ``owner`` until its ``release``."""
        self._check_open()
        if not hashes:
            return []
        status, result = self._run("get", self._prefix, owner, *_hexes(hashes))
        if status == b"missing":
            raise KeyError(f"block {result.decode()} is not in the store")
        return [self._plane.read(payload) for payload in result]

    @_reachable
    def release(self, owner: str) -> None:
        self._check_open()
        self._run("release", self._prefix, owner)

    @_reachable
    def stats(self) -> StoreStats:
        self._check_open()
        num_blocks, num_pinned_blocks = self._run("stats", self._prefix)
        return StoreStats(
            num_blocks=int(num_blocks),
            num_pinned_blocks=int(num_pinned_blocks),
            capacity_blocks=self._capacity_blocks,
        )

    def clear(self) -> None:
        """Drops every block and pin of the namespace, for every handle: only safe while no
        request uses the store. Recovers space a crashed process left behind."""
        self._check_open()
        self._drop("clear")

    def close(self) -> None:
        """Closes this handle; the last open handle of the namespace wipes it. Idempotent."""
        with self._close_lock:
            if self._is_closed:
                return
            self._is_closed = True
        try:
            self._drop("close")
        finally:
            self._client.close()

    def _commit_put(
        self,
        owner: str,
        blocks: Sequence[tuple[BlockHash, bytes]],
        data_by_hex: dict[str, bytes],
        written: dict[str, bytes],
    ) -> tuple[set[str], list[bytes]]:
        """Runs the put script until it commits, writing the blocks it reports absent;
        returns the blocks whose indexed payload is one this call wrote, and the payloads
        it evicted.

        The first attempt sends no bytes, so a put of blocks already stored costs one round
        trip. Each retry writes at least one more block, so the loop ends."""
        listed = _hexes(hash_ for hash_, _ in blocks)
        payloads_are_refs = "1" if self._plane.holds_external_data else "0"
        while True:
            reply = self._run(
                "put",
                self._prefix,
                self._capacity_blocks,
                owner,
                payloads_are_refs,
                len(listed),
                *listed,
                *chain.from_iterable(written.items()),
            )
            status = reply[0]
            if status == b"ok":
                return {h.decode() for h in reply[1]}, list(reply[2])
            if status == b"full":
                num_new, num_free, num_evictable = (int(x) for x in reply[1:4])
                raise StoreFullError(num_new, num_free, num_evictable, self._capacity_blocks)
            for raw_hex in reply[1]:
                block_hex = raw_hex.decode()
                written[block_hex] = self._plane.write(block_hex, data_by_hex[block_hex])

    def _register_handle(self) -> None:
        reply = self._run("open", self._prefix, self._config, self._handle_id)
        if reply[0] == b"mismatch":
            self._client.close()
            raise ValueError(
                f"namespace {self._prefix[:-1]!r} has {reply[1].decode()} but this handle "
                f"asks for {self._config}; every handle must agree (or use another namespace)"
            )

    def _drop(self, mode: str) -> None:
        want_payloads = "1" if self._plane.holds_external_data else "0"
        dropped = self._run("drop", self._prefix, mode, want_payloads, self._handle_id)
        self._plane.discard(dropped)

    def _run(self, script: str, *args: Any) -> Any:
        # EVALSHA; redis-py sends the script body itself the first time a server lacks it.
        return self._scripts[script](args=args)

    def _check_open(self) -> None:
        # A closed handle must not write: the namespace may already be wiped, and what it
        # wrote then would never be.
        if self._is_closed:
            raise RuntimeError("this KV store handle is closed")


def _hexes(hashes: Iterable[BlockHash]) -> list[str]:
    return [block_hash.hex() for block_hash in hashes]
