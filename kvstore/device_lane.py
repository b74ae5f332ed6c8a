"""The device lane: a prefill worker's freshly computed KV blocks, read by decode workers of
the same host straight from the prefill worker's device memory.

The host tiers are too slow for the hand-off on a GPU host: an 8k-token prompt of a
Llama-8B shape has 1 GiB of KV, which the host path moves at a few GB/s while the prefill
computes it in a fifth of a second. The lane keeps the hand-off on the device:

- The writer (a prefill worker) owns a ``DeviceArena``: a ring of block rows in its device
  memory. Publishing a chunk gathers its blocks into the next rows (a device copy) and
  names them in the ``LaneIndex`` shared with the readers.
- A reader (a decode worker) looks the names up, maps the arena (the same tensor in one
  process; CUDA IPC between processes of one host) and copies the rows into its own cache:
  a device-to-device copy, or a peer copy between GPUs of one host.
- Rows are reused in ring order. A slot names one write of one row (arena, row, epoch);
  the writer drops a row's old name before it writes the row again, and a reader looks
  its blocks up again after its copy: a block whose slot changed meanwhile (a sequence
  lock) is fetched from the store instead.
- A reused row whose block no reader took and the store lacks is first written to the
  store (the host tier below), so every published block stays readable somewhere.

A lane block is never pinned in the store: the lane is a cache in front of it for the one
reader the hand-off is for. ``LaneIndex`` has two implementations: ``MemoryLaneIndex`` for
one process (``pdmesh up``), ``RedisLaneIndex`` for processes sharing a Redis store.
"""

from __future__ import annotations

import json
import struct
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from kvstore.block_hash import HASH_BYTES, BlockHash
from kvstore.gpu_paths import export_cuda_tensor, host_id, import_cuda_tensor
from kvstore.redis_scripts import load_scripts

_KEY_NAMES = ("arena", "slot", "taken")
# Seconds before mapping an arena that could not be mapped is tried again.
RETRY_MAP_S = 5.0

# Arenas of this process by id: readers in the writer's process use the tensor itself
# (CUDA IPC cannot map a process's own memory).
_LOCAL_ARENAS: dict[str, torch.Tensor] = {}


@dataclass(frozen=True)
class LaneSlot:
    """Where a published block is: row ``row`` of arena ``arena_id``, as written in
    ``epoch`` (valid while the row's epoch is still that)."""

    arena_id: str
    row: int
    epoch: int


class DeviceArena:
    """A writer's ring of ``num_rows`` block rows of ``block_bytes`` on ``device``.

    Only the writer uses this object; readers see the rows through a ``LaneIndex``."""

    def __init__(self, block_bytes: int, num_rows: int, device: torch.device | str) -> None:
        if block_bytes < 1 or num_rows < 1:
            raise ValueError(f"need block_bytes, num_rows >= 1, got {block_bytes}, {num_rows}")
        self.arena_id = uuid.uuid4().hex[:16]
        self.block_bytes = block_bytes
        self.rows = torch.empty(
            (num_rows, block_bytes), dtype=torch.uint8, device=device
        )  # (num_rows, block_bytes)
        #: The block each row holds now (None: never written), and the epoch it was
        #: written in (epochs only grow, so a slot names one write of one row).
        self.held: list[BlockHash | None] = [None] * num_rows
        self.epochs = [0] * num_rows
        self._last_epoch = 0
        self._next = 0
        _LOCAL_ARENAS[self.arena_id] = self.rows

    @property
    def num_rows(self) -> int:
        return int(self.rows.shape[0])

    def next_rows(self, count: int) -> list[int]:
        """The ``count`` rows to write next, in ring order."""
        if not 0 < count <= self.num_rows:
            raise ValueError(f"can take 1..{self.num_rows} rows at once, asked for {count}")
        rows = [(self._next + i) % self.num_rows for i in range(count)]
        self._next = (self._next + count) % self.num_rows
        return rows

    def contents(self, rows: Sequence[int]) -> list[tuple[BlockHash, LaneSlot]]:
        """What the written ones among ``rows`` hold now."""
        return [
            (block_hash, LaneSlot(self.arena_id, row, self.epochs[row]))
            for row in rows
            if (block_hash := self.held[row]) is not None
        ]

    def fill(self, rows: Sequence[int], hashes: Sequence[BlockHash]) -> list[LaneSlot]:
        """Records that ``rows`` now hold ``hashes``, in a new epoch; their slots."""
        self._last_epoch += 1
        for row, block_hash in zip(rows, hashes, strict=True):
            self.held[row], self.epochs[row] = block_hash, self._last_epoch
        return [LaneSlot(self.arena_id, row, self._last_epoch) for row in rows]

    def close(self) -> None:
        _LOCAL_ARENAS.pop(self.arena_id, None)


class LaneIndex(ABC):
    """Names of published lane blocks (block hash -> slot), shared by the writers and
    readers of one store. Thread-safe.

    The sequence lock: a writer ``forget``s a row's block before it writes the row again,
    so a reader that finds the same slots after its copy as before copied whole blocks."""

    @abstractmethod
    def register(self, arena: DeviceArena) -> None:
        """Makes ``arena``'s rows reachable by readers."""

    @abstractmethod
    def unregister(self, arena_id: str) -> None:
        """Forgets the arena: its blocks are no longer found."""

    @abstractmethod
    def arena_rows(self, arena_id: str) -> torch.Tensor | None:
        """The arena's rows mapped into this process; None if unreachable from here."""

    @abstractmethod
    def publish(self, blocks: Sequence[tuple[BlockHash, LaneSlot]]) -> None:
        """Names each block's slot for readers; the rows hold the data already."""

    @abstractmethod
    def forget(self, blocks: Sequence[tuple[BlockHash, LaneSlot]]) -> None:
        """Drops each block's name where it is still that slot (its row is about to be
        written again; a newer slot of the same block stays)."""

    @abstractmethod
    def lookup(self, hashes: Sequence[BlockHash]) -> list[LaneSlot | None]:
        """Each block's slot, None where the lane has none."""

    @abstractmethod
    def confirm(self, blocks: Sequence[tuple[BlockHash, LaneSlot]]) -> list[bool]:
        """A reader copied these blocks from these slots: whether each block still has that
        slot (its copy is whole); those that do are marked taken (the writer may reuse
        their rows freely)."""

    @abstractmethod
    def forget_taken(self, blocks: Sequence[tuple[BlockHash, LaneSlot]]) -> list[bool]:
        """``forget`` for the blocks a reader took; whether each was taken."""


class MemoryLaneIndex(LaneIndex):
    """The index of one process: writers and readers share the arenas' tensors."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._arenas: dict[str, torch.Tensor] = {}
        self._slots: dict[BlockHash, LaneSlot] = {}
        self._taken: set[LaneSlot] = set()

    def register(self, arena: DeviceArena) -> None:
        with self._lock:
            self._arenas[arena.arena_id] = arena.rows

    def unregister(self, arena_id: str) -> None:
        with self._lock:
            self._arenas.pop(arena_id, None)
            self._slots = {h: s for h, s in self._slots.items() if s.arena_id != arena_id}
            self._taken = {s for s in self._taken if s.arena_id != arena_id}

    def arena_rows(self, arena_id: str) -> torch.Tensor | None:
        with self._lock:
            return self._arenas.get(arena_id)

    def publish(self, blocks: Sequence[tuple[BlockHash, LaneSlot]]) -> None:
        with self._lock:
            self._slots.update(blocks)

    def forget(self, blocks: Sequence[tuple[BlockHash, LaneSlot]]) -> None:
        with self._lock:
            for block_hash, slot in blocks:
                if self._slots.get(block_hash) == slot:
                    del self._slots[block_hash]
                self._taken.discard(slot)

    def lookup(self, hashes: Sequence[BlockHash]) -> list[LaneSlot | None]:
        with self._lock:
            return [self._slots.get(h) for h in hashes]

    def confirm(self, blocks: Sequence[tuple[BlockHash, LaneSlot]]) -> list[bool]:
        with self._lock:
            whole = [
                self._slots.get(h) == slot and slot.arena_id in self._arenas for h, slot in blocks
            ]
            self._taken.update(slot for (_, slot), ok in zip(blocks, whole, strict=True) if ok)
            return whole

    def forget_taken(self, blocks: Sequence[tuple[BlockHash, LaneSlot]]) -> list[bool]:
        with self._lock:
            taken = [slot in self._taken for _, slot in blocks]
        self.forget([block for block, is_taken in zip(blocks, taken, strict=True) if is_taken])
        return taken


# Lane scripts take their items packed into ARGV[1] (fixed-width records: block hash of
# ARGV[2] bytes, 28-byte slot) and answer with one string: one round trip and one argument however
# many blocks, where an argument per block costs the client more in Python than the
# hand-off's copies take on the device (kvstore/lua/lane/).

# A slot as stored: arena id (16 ASCII characters), row, epoch (epochs start at 1).
_SLOT = struct.Struct(">16sIQ")


class RedisLaneIndex(LaneIndex):
    """The index in a store's Redis: processes of one host share the lane through CUDA IPC
    (an arena registered from another host is unreachable, and its blocks come from the
    store). Keys, under the store's namespace prefix: ``lane:arena`` (arena id -> its IPC
    handle, JSON), ``lane:slot`` (block hash -> packed slot) and ``lane:taken`` (the packed
    slots readers took, as a set)."""

    def __init__(
        self,
        client: Any,
        prefix: str,
        guard: Callable[[], AbstractContextManager[None]] = nullcontext,
    ) -> None:
        self._client = client
        self._keys = dict(zip(_KEY_NAMES, self.key_names(prefix), strict=True))
        #: Wraps every Redis call: the store's own error mapping (Redis gone -> unavailable).
        self._guard = guard
        self._scripts = {
            name: client.register_script(body) for name, body in load_scripts("lane").items()
        }
        self._lock = threading.Lock()
        # Arenas of other processes: mapped rows, or None and when mapping last failed.
        self._mapped: dict[str, tuple[torch.Tensor | None, float]] = {}

    @staticmethod
    def key_names(prefix: str) -> list[str]:
        return [f"{prefix}lane:{name}" for name in _KEY_NAMES]

    def register(self, arena: DeviceArena) -> None:
        handle = export_cuda_tensor(arena.rows) if arena.rows.is_cuda else {"host": host_id()}
        self._call("hset", self._keys["arena"], arena.arena_id, json.dumps(handle))

    def unregister(self, arena_id: str) -> None:
        self._call("hdel", self._keys["arena"], arena_id)

    def arena_rows(self, arena_id: str) -> torch.Tensor | None:
        if arena_id in _LOCAL_ARENAS:
            return _LOCAL_ARENAS[arena_id]
        with self._lock:
            rows, tried = self._mapped.get(arena_id, (None, -RETRY_MAP_S))
            if rows is None and time.monotonic() - tried >= RETRY_MAP_S:
                rows = self._map(arena_id)  # an arena not mapped yet is tried again later
                self._mapped[arena_id] = (rows, time.monotonic())
            return rows

    def _map(self, arena_id: str) -> torch.Tensor | None:
        raw = self._call("hget", self._keys["arena"], arena_id)
        if raw is None:
            return None
        handle = json.loads(raw)
        if "fields" not in handle:  # a host-memory arena: one process only
            return None
        try:
            return import_cuda_tensor(handle)
        except RuntimeError:  # another host's, no IPC between these devices, or gone
            return None

    def publish(self, blocks: Sequence[tuple[BlockHash, LaneSlot]]) -> None:
        if blocks:
            self._script("publish", [self._keys["slot"]], _pack_blocks(blocks))

    def forget(self, blocks: Sequence[tuple[BlockHash, LaneSlot]]) -> None:
        if blocks:
            keys = [self._keys["slot"], self._keys["taken"]]
            self._script("forget", keys, _pack_blocks(blocks))

    def lookup(self, hashes: Sequence[BlockHash]) -> list[LaneSlot | None]:
        if not hashes:
            return []
        found = self._script("lookup", [self._keys["slot"]], _pack_hashes(hashes))
        size = _SLOT.size
        return [_unpack_slot(found[i : i + size]) for i in range(0, len(found), size)]

    def confirm(self, blocks: Sequence[tuple[BlockHash, LaneSlot]]) -> list[bool]:
        if not blocks:
            return []
        keys = [self._keys["slot"], self._keys["taken"], self._keys["arena"]]
        return [flag == ord("1") for flag in self._script("confirm", keys, _pack_blocks(blocks))]

    def forget_taken(self, blocks: Sequence[tuple[BlockHash, LaneSlot]]) -> list[bool]:
        if not blocks:
            return []
        keys = [self._keys["slot"], self._keys["taken"]]
        flags = self._script("forget_taken", keys, _pack_blocks(blocks))
        return [flag == ord("1") for flag in flags]

    def _script(self, name: str, keys: list[str], packed: bytes) -> Any:
        with self._guard():
            return self._scripts[name](keys=keys, args=[packed, HASH_BYTES])

    def _call(self, command: str, *args: Any, **kwargs: Any) -> Any:
        with self._guard():
            return getattr(self._client, command)(*args, **kwargs)


def _pack_slot(slot: LaneSlot) -> bytes:
    return _SLOT.pack(slot.arena_id.encode(), slot.row, slot.epoch)


def _unpack_slot(record: bytes) -> LaneSlot | None:
    arena_id, row, epoch = _SLOT.unpack(record)
    return LaneSlot(arena_id.rstrip(b"\0").decode(), row, epoch) if epoch else None


def _pack_hashes(hashes: Sequence[BlockHash]) -> bytes:
    if any(len(h) != HASH_BYTES for h in hashes):
        raise ValueError(f"block hashes are {HASH_BYTES} bytes")
    return b"".join(hashes)


def _pack_blocks(blocks: Sequence[tuple[BlockHash, LaneSlot]]) -> bytes:
    packed = _pack_hashes([h for h, _ in blocks])
    size = HASH_BYTES
    return b"".join(
        packed[i * size : (i + 1) * size] + _pack_slot(slot) for i, (_, slot) in enumerate(blocks)
    )
