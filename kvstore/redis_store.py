"""The KV store shared by processes on many hosts: index in Redis, bytes in data planes.

Each operation is one Lua script (``kvstore.redis_scripts``), so pins, inserts, moves
between tiers and evictions from different processes never interleave. Block bytes go to a
data plane *before* the script that makes them visible runs, so a reader never sees a
half-written block; a pinned block is never evicted, so a reader's bytes cannot vanish
while it copies them (a pinned disk block may move up to DRAM meanwhile: the reader then
looks it up again).

Tiers: DRAM (the ``redis``, ``shm`` or ``p2p`` plane) above an optional disk tier of block
files (``kvstore.disk_tier``; a path every handle can reach: one host, or a shared mount,
or with ``p2p`` each host's own disk, served to the others by its peer server).

Leases: an owner's pins expire ``lease_ttl_s`` after its last ``put``, ``get`` or ``renew``,
so a worker that dies holding pins frees them without anyone cleaning up after it.

The namespace lives as long as some handle is open: the last ``close`` wipes its keys and
frees its shared-memory segments and files. A process that dies without closing leaves its
handle registered (``<namespace>:handles`` names host and pid) and the namespace is then
never wiped by a close; ``clear`` drops its blocks explicitly (call it when no request is in
flight, e.g. at cluster start).

The Redis must keep every key it is given (``maxmemory-policy noeviction``, its default):
the store does its own eviction, and a key Redis dropped on its own would corrupt the index.
While Redis is unreachable every operation raises ``StoreUnavailableError``. A Redis
restarted without persistence comes back empty and consistent (the store is a cache); the
segments and files the old index named are then orphans that ``clear`` cannot see.

If a put's connection breaks for good after Redis committed it, the put frees the segments
it wrote although the index names them; readers of those blocks get ``KeyError``, as for
any missing block.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from typing import Any

import redis

from kvstore import redis_scripts
from kvstore.base import KVStore, StoreMetrics, StoreStats, TierOccupancy
from kvstore.block_hash import BlockHash
from kvstore.config import TierConfig
from kvstore.data_planes import DataPlane, DataPlaneKind, SharedMemoryPlane, make_data_plane
from kvstore.device_lane import RedisLaneIndex
from kvstore.disk_tier import DiskFilePlane
from kvstore.errors import StoreFullError, StoreUnavailableError
from kvstore.peer_plane import BlockPeerServer, PeerPlane

# A put or promotion that keeps losing its victims to other writers stops asking for disk
# copies after this many rounds and drops the victims instead (bounded work per call).
_MAX_DEMOTE_ROUNDS = 8
_DROP = b""  # an offer that means "drop this victim instead of demoting it"


class RedisKVStore(KVStore):
    """A handle on the store named ``namespace`` in the Redis at ``url``.

    ``data_plane="redis"`` keeps block bytes in Redis (any host); ``"shm"`` keeps them in
    POSIX shared memory (processes on the Redis index's host, or at least all on one host).
    Every handle of a namespace must use the same data plane, capacities and lease TTL.
    """

    def __init__(
        self,
        url: str,
        capacity_blocks: int,
        namespace: str = "pdmesh",
        data_plane: DataPlaneKind = "redis",
        tiers: TierConfig | None = None,
    ) -> None:
        tiers = tiers or TierConfig(capacity_blocks)
        if tiers.capacity_blocks != capacity_blocks:
            raise ValueError("capacity_blocks and tiers.capacity_blocks differ")
        self._tiers = tiers
        self._capacity_blocks = capacity_blocks
        self._prefix = f"{namespace}:"
        self._plane_kind = data_plane
        self._disk_files = (
            DiskFilePlane(tiers.disk_path(namespace), namespace) if tiers.has_disk else None
        )
        self._peers: BlockPeerServer | None = None
        self._plane: DataPlane
        self._disk: DataPlane | None
        if data_plane == "p2p":
            self._plane, self._disk = self._open_peer_planes(namespace)
        else:
            self._plane, self._disk = make_data_plane(data_plane, namespace), self._disk_files
        self._refs = "1" if self._plane.holds_external_data else "0"
        self._client = redis.Redis.from_url(url)
        self._url = url
        self._scripts = {
            name: self._client.register_script(body) for name, body in redis_scripts.SCRIPTS.items()
        }
        # What every handle of the namespace must agree on, checked when it opens.
        self._config = (
            f"capacity_blocks={capacity_blocks} data_plane={data_plane} "
            + (tiers.describe().partition(" ")[2])
        )
        self._handle_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._close_lock = threading.Lock()
        self._is_closed = False
        self._bytes_moved: Counter[str] = Counter()
        # Engine and host-publisher threads both move bytes through one handle.
        self._moved_lock = threading.Lock()
        self._register_handle()

    @property
    def block_path(self) -> str:
        return "shared-memory" if isinstance(self._plane, SharedMemoryPlane) else "redis"

    def put(self, owner: str, blocks: Sequence[tuple[BlockHash, bytes]]) -> None:
        self._check_open()
        if not blocks:
            return
        data_by_hex: dict[str, bytes] = {}
        for block_hash, data in blocks:
            data_by_hex.setdefault(block_hash.hex(), data)
        written: dict[str, bytes] = {}  # block hex -> payload this call wrote
        offers: dict[str, bytes] = {}  # victim hex -> disk copy this call wrote
        indexed: set[str] = set()
        try:
            indexed, dram_freed, disk_freed = self._commit_put(
                owner, blocks, data_by_hex, written, offers
            )
        except BaseException:
            self._free_disk(offers.values())
            raise
        finally:
            # Payloads of blocks another process stored first, or of a failed put.
            self._plane.discard(p for h, p in written.items() if h not in indexed)
        self._plane.discard(dram_freed)
        self._free_disk(disk_freed)

    def match_prefix(self, hashes: Sequence[BlockHash]) -> int:
        self._check_open()
        if not hashes:
            return 0
        return int(self._run("match_prefix", self._prefix, *_hexes(hashes)))

    def get(self, owner: str, hashes: Sequence[BlockHash]) -> list[bytes]:
        """Pins, then reads; disk blocks move up to DRAM afterwards. If a shared-memory
        segment or file turns out to be gone, the pins this call took stay with ``owner``
        until its ``release``."""
        self._check_open()
        if not hashes:
            return []
        ttl = self._tiers.lease_ttl_ms
        status, *result = self._run("get", self._prefix, ttl, owner, *_hexes(hashes))
        if status == b"missing":
            raise KeyError(f"block {result[0].decode()} is not in the store")
        tiers, payloads = result
        data = [
            self._read(block_hash, tier, payload)
            for block_hash, tier, payload in zip(hashes, tiers, payloads, strict=True)
        ]
        promoted: set[BlockHash] = set()
        for block_hash, tier, payload, block in zip(hashes, tiers, payloads, data, strict=True):
            if tier == b"disk" and block_hash not in promoted:
                promoted.add(block_hash)
                self._promote(block_hash.hex(), payload, block)
        return data

    def release(self, owner: str) -> None:
        self._check_open()
        self._run("release", self._prefix, owner)

    def locate(self, block_hash: BlockHash) -> str | None:
        self._check_open()
        reply = self._run("locate", self._prefix, block_hash.hex())
        return reply[0].decode() if reply else None

    def renew(self, owner: str) -> bool:
        self._check_open()
        return bool(self._run("renew", self._prefix, self._tiers.lease_ttl_ms, owner))

    def stats(self) -> StoreStats:
        self._check_open()
        num_dram, num_pinned_dram, num_disk, num_pinned_disk, *_ = self._run("stats", self._prefix)
        return StoreStats(
            num_blocks=int(num_dram) + int(num_disk),
            num_pinned_blocks=int(num_pinned_dram) + int(num_pinned_disk),
            capacity_blocks=self._capacity_blocks,
        )

    def metrics(self) -> StoreMetrics:
        self._check_open()
        reply = self._run("stats", self._prefix)
        num_dram, pinned_dram, num_disk, pinned_disk, num_owners = (int(x) for x in reply[:5])
        flat = reply[5]
        events = {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}
        tiers = [TierOccupancy("dram", num_dram, pinned_dram, self._capacity_blocks)]
        if self._disk is not None:
            tiers.append(
                TierOccupancy("disk", num_disk, pinned_disk, self._tiers.disk_capacity_blocks)
            )
        return StoreMetrics(
            tiers=tuple(tiers),
            hits=events.get("hits", 0),
            misses=events.get("misses", 0),
            demotions=events.get("demotions", 0),
            promotions=events.get("promotions", 0),
            evictions=events.get("evictions", 0),
            expired_owners=events.get("expired_owners", 0),
            num_owners=num_owners,
            bytes_moved=self._bytes_by_path(),
        )

    def _bytes_by_path(self) -> dict[str, int]:
        with self._moved_lock:
            moved = dict(self._bytes_moved)
        planes = (self._plane, self._disk)
        remote = sum(p.bytes_from_peers for p in planes if isinstance(p, PeerPlane))
        if remote:
            moved["p2p_remote_read"] = remote
        return moved

    def disk_files(self) -> list[str]:
        """This namespace's block files that exist now (tests count them for leaks)."""
        return self._disk_files.file_names() if self._disk_files is not None else []

    @property
    def peer_address(self) -> str | None:
        """Where peers reach this handle's block server (``redis+p2p`` only)."""
        return self._peers.address if self._peers is not None else None

    def sweep_orphans(self, min_age_s: float = 60.0) -> int:
        """Frees this namespace's segments and block files on this host that the index does
        not name: left by a process that died between writing and indexing them, or by a
        Redis that restarted empty. Spares those younger than ``min_age_s``, which may
        belong to a put still in flight. Returns how many it freed."""
        self._check_open()
        dram, disk = self._run("payloads", self._prefix, self._refs)
        num_freed = 0
        planes = [(self._plane, dram), (self._disk, disk)]
        for plane, payloads in planes:
            if plane is None:
                continue
            indexed = {plane.payload_name(p) for p in payloads}
            orphans = [
                name
                for name, age in plane.stored_names().items()
                if name not in indexed and age >= min_age_s
            ]
            plane.discard_stored(orphans)
            num_freed += len(orphans)
        return num_freed

    def clear(self) -> None:
        """Drops every block and pin of the namespace, for every handle: only safe while no
        request uses the store. Recovers space a crashed process left behind."""
        self._check_open()
        self._drop("clear")

    def device_lane(self) -> RedisLaneIndex | None:
        """The lane index in this store's Redis, for a shared-memory store: its workers are
        on one host by construction, where CUDA IPC reaches every arena. Stores that serve
        other hosts have no lane (their readers could not map the arenas)."""
        if self._plane_kind != "shm":
            return None
        return RedisLaneIndex(self._client, self._prefix, self._unavailable_as_store_error)

    def close(self) -> None:
        """Closes this handle; the last open handle of the namespace wipes it. Idempotent."""
        with self._close_lock:
            if self._is_closed:
                return
            self._is_closed = True
        try:
            self._forget_dead_handles_of_this_host()
            if self._peers is not None:
                self._drop_served_blocks()
            self._drop("close")
        finally:
            self._client.close()
            self._remove_disk_dir_if_empty()
            if self._peers is not None:
                self._peers.stop()
                for plane in (self._plane, self._disk):
                    if isinstance(plane, PeerPlane):
                        plane.close()

    # -- put ---------------------------------------------------------------------------

    def _commit_put(
        self,
        owner: str,
        blocks: Sequence[tuple[BlockHash, bytes]],
        data_by_hex: dict[str, bytes],
        written: dict[str, bytes],
        offers: dict[str, bytes],
    ) -> tuple[set[str], list[bytes], list[bytes]]:
        """Runs the put script until it commits, writing the blocks it reports absent and
        disk copies of the DRAM victims it names; returns the blocks whose indexed payload
        is one this call wrote, and the DRAM and disk payloads to free.

        The first attempt sends no bytes, so a put of blocks already stored costs one round
        trip. Each retry writes at least one more block or copy, so the loop ends."""
        listed = _hexes(hash_ for hash_, _ in blocks)
        for round_ in range(_MAX_DEMOTE_ROUNDS + len(listed) + 1):
            reply = self._run(
                "put",
                self._prefix,
                self._capacity_blocks,
                self._tiers.disk_capacity_blocks,
                self._tiers.lease_ttl_ms,
                owner,
                self._refs,
                len(listed),
                *listed,
                len(written),
                *chain.from_iterable(written.items()),
                *chain.from_iterable(offers.items()),
            )
            status = reply[0]
            if status == b"ok":
                return {h.decode() for h in reply[1]}, list(reply[2]), list(reply[3])
            if status == b"full":
                num_new, num_free, num_evictable = (int(x) for x in reply[1:4])
                raise StoreFullError(num_new, num_free, num_evictable, self._capacity_blocks)
            if status == b"demote":
                give_up = round_ >= _MAX_DEMOTE_ROUNDS
                for raw_hex, payload in zip(reply[1::2], reply[2::2], strict=True):
                    block_hex = raw_hex.decode()
                    offers[block_hex] = _DROP if give_up else self._copy_to_disk(block_hex, payload)
                continue
            for raw_hex in reply[1]:
                block_hex = raw_hex.decode()
                data = data_by_hex[block_hex]
                written[block_hex] = self._plane.write(block_hex, data)
                self._count_moved(f"{self._plane_kind}_write", len(data))
        raise RuntimeError("KV store put did not converge")  # unreachable: see the docstring

    def _copy_to_disk(self, block_hex: str, dram_payload: bytes) -> bytes:
        """A disk copy of a DRAM block about to be demoted; ``_DROP`` if its DRAM bytes are
        already gone (another process evicted it between the script and this read)."""
        assert self._disk is not None
        try:
            data = self._plane.read(dram_payload)
        except KeyError:
            return _DROP
        self._count_moved(f"{self._plane_kind}_read", len(data))
        self._count_moved("disk_write", len(data))
        return self._disk.write(block_hex, data)

    # -- get ---------------------------------------------------------------------------

    def _read(self, block_hash: BlockHash, tier: bytes, payload: bytes) -> bytes:
        """The bytes of a block this handle pinned. A disk block another reader moved up
        meanwhile is read again where it went (it is pinned, so it went somewhere)."""
        try:
            return self._read_from(tier, payload)
        except KeyError:
            if tier != b"disk":
                raise
        moved = self._run("locate", self._prefix, block_hash.hex())
        if not moved:
            raise KeyError(f"block {block_hash.hex()} vanished while pinned")
        return self._read_from(moved[0], moved[1])

    def _read_from(self, tier: bytes, payload: bytes) -> bytes:
        if tier == b"disk":
            assert self._disk is not None, "a disk block in a store opened without a disk tier"
            data = self._disk.read(payload)
            self._count_moved("disk_read", len(data))
        else:
            data = self._plane.read(payload)
            self._count_moved(f"{self._plane_kind}_read", len(data))
        return data

    def _promote(self, block_hex: str, disk_payload: bytes, data: bytes) -> None:
        """Moves a disk block this handle pinned up to DRAM, swapping down the oldest
        unpinned DRAM block when DRAM is full; leaves it on disk when DRAM is all pinned."""
        new_dram = self._plane.write(block_hex, data)
        self._count_moved(f"{self._plane_kind}_write", len(data))
        offer: tuple[bytes, ...] = ()
        try:
            for round_ in range(_MAX_DEMOTE_ROUNDS + 1):
                reply = self._run(
                    "promote",
                    self._prefix,
                    self._capacity_blocks,
                    self._tiers.disk_capacity_blocks,
                    self._refs,
                    block_hex,
                    disk_payload,
                    new_dram,
                    *offer,
                )
                if reply[0] != b"victim":
                    self._plane.discard(reply[1])
                    self._free_disk(reply[2])
                    return
                self._free_disk(offer[1:])  # an earlier victim: never indexed
                victim_hex = reply[1].decode()
                copy = _DROP if round_ == _MAX_DEMOTE_ROUNDS else None
                offer = (reply[1], copy or self._copy_to_disk(victim_hex, reply[2]))
        except BaseException:
            self._plane.discard([new_dram])
            self._free_disk(offer[1:])
            raise

    # -- plumbing ----------------------------------------------------------------------

    def _drop_served_blocks(self) -> None:
        """Takes the blocks this handle's server serves out of the index before the server
        stops: other hosts could not reach them any more."""
        assert isinstance(self._plane, PeerPlane)
        dram, disk = self._run("drop_served", self._prefix, self._plane.address_prefix)
        self._plane.discard(dram)
        if self._disk is not None:
            self._disk.discard(disk)

    def _open_peer_planes(self, namespace: str) -> tuple[DataPlane, DataPlane | None]:
        local: dict[str, DataPlane] = {"shm": SharedMemoryPlane(namespace)}
        if self._disk_files is not None:
            local["disk"] = self._disk_files
        advertise = self._tiers.peer_host or socket.gethostname()
        self._peers = BlockPeerServer(local, bind_host="0.0.0.0", advertise_host=advertise)
        dram = PeerPlane(local["shm"], "shm", self._peers)
        disk = PeerPlane(local["disk"], "disk", self._peers) if "disk" in local else None
        return dram, disk

    def _remove_disk_dir_if_empty(self) -> None:
        if self._disk_files is not None:
            # Fails while other namespaces' or live handles' files are still in it.
            with contextlib.suppress(OSError):
                self._disk_files.directory.rmdir()

    def _free_disk(self, payloads: Iterable[bytes]) -> None:
        if self._disk is not None:
            self._disk.discard(p for p in payloads if p != _DROP)

    def _register_handle(self) -> None:
        reply = self._run("open", self._prefix, self._config, self._handle_id)
        if reply[0] == b"mismatch":
            self._client.close()
            raise ValueError(
                f"namespace {self._prefix[:-1]!r} has {reply[1].decode()} but this handle "
                f"asks for {self._config}; every handle must agree (or use another namespace)"
            )

    def _forget_dead_handles_of_this_host(self) -> None:
        """Unregisters handles whose process on this host is gone, so they do not keep the
        namespace alive forever (handles of other hosts cannot be checked from here)."""
        host = socket.gethostname()
        dead = []
        for raw in self._run_command("smembers", f"{self._prefix}handles"):
            handle_host, _, rest = raw.decode().partition(":")
            pid = int(rest.partition(":")[0])
            if handle_host == host and pid != os.getpid() and not _process_exists(pid):
                dead.append(raw)
        if dead:
            self._run_command("srem", f"{self._prefix}handles", *dead)

    def _count_moved(self, path: str, num_bytes: int) -> None:
        with self._moved_lock:
            self._bytes_moved[path] += num_bytes

    def _run_command(self, name: str, *args: Any) -> Any:
        with self._unavailable_as_store_error():
            return getattr(self._client, name)(*args)

    def _drop(self, mode: str) -> None:
        dram_freed, disk_freed = self._run("drop", self._prefix, mode, self._refs, self._handle_id)
        if mode == "clear" or not self._run_command("exists", f"{self._prefix}handles"):
            self._run_command("delete", *RedisLaneIndex.key_names(self._prefix))
        self._plane.discard(dram_freed)
        self._free_disk(disk_freed)

    def _run(self, script: str, *args: Any) -> Any:
        # EVALSHA; redis-py sends the script body itself the first time a server lacks it.
        with self._unavailable_as_store_error():
            return self._scripts[script](args=args)

    @contextmanager
    def _unavailable_as_store_error(self) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as error:
            raise StoreUnavailableError(
                f"KV store index at {self._url} is unreachable ({error}); "
                "nothing is known about this operation's effect, retry when it is back"
            ) from error

    def _check_open(self) -> None:
        # A closed handle must not write: the namespace may already be wiped, and what it
        # wrote then would never be.
        if self._is_closed:
            raise RuntimeError("this KV store handle is closed")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _hexes(hashes: Iterable[BlockHash]) -> list[str]:
    return [block_hash.hex() for block_hash in hashes]
