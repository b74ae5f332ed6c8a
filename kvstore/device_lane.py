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
- Rows are reused in ring order. Each row has an *epoch* that the writer bumps before it
  writes the row again; a reader checks after its copy that the epochs it read are
  unchanged (a sequence lock), and fetches any block whose row moved on from the store.
- A reused row whose block no reader took and the store lacks is first written to the
  store (the host tier below), so every published block stays readable somewhere.

A lane block is never pinned in the store: the lane is a cache in front of it for the one
reader the hand-off is for. ``LaneIndex`` has two implementations: ``MemoryLaneIndex`` for
one process (``pdmesh up``), ``RedisLaneIndex`` for processes sharing a Redis store.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvstore.block_hash import BlockHash

_KEY_NAMES = ("arena", "slot", "epoch", "taken")

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
        #: The block each row holds now (None: never written).
        self.held: list[BlockHash | None] = [None] * num_rows
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

    def close(self) -> None:
        _LOCAL_ARENAS.pop(self.arena_id, None)


class LaneIndex(ABC):
    """Names of published lane blocks, shared by the writers and readers of one store.
    Thread-safe."""

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
    def retire(self, arena_id: str, rows: Sequence[int]) -> list[int]:
        """Before rows are written again: bumps their epochs (readers of the old contents
        will see the change) and returns the new epochs."""

    @abstractmethod
    def publish(self, arena_id: str, blocks: Sequence[tuple[BlockHash, int, int]]) -> None:
        """Names ``(block_hash, row, epoch)`` for readers; the rows hold the data already."""

    @abstractmethod
    def lookup(self, hashes: Sequence[BlockHash]) -> list[LaneSlot | None]:
        """Each block's slot, None where the lane has none (or its row moved on)."""

    @abstractmethod
    def epochs(self, slots: Sequence[LaneSlot]) -> list[int]:
        """The current epoch of each slot's row."""

    @abstractmethod
    def mark_taken(self, slots: Sequence[LaneSlot]) -> None:
        """A reader copied the slots' blocks: the writer may reuse their rows freely."""

    @abstractmethod
    def taken(self, arena_id: str, rows: Sequence[int]) -> list[bool]:
        """Whether a reader took each row's current block."""


class MemoryLaneIndex(LaneIndex):
    """The index of one process: writers and readers share the arenas' tensors."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._arenas: dict[str, torch.Tensor] = {}
        self._slots: dict[BlockHash, LaneSlot] = {}
        self._epochs: dict[tuple[str, int], int] = {}
        self._taken: dict[tuple[str, int], int] = {}  # (arena, row) -> epoch taken

    def register(self, arena: DeviceArena) -> None:
        with self._lock:
            self._arenas[arena.arena_id] = arena.rows

    def unregister(self, arena_id: str) -> None:
        with self._lock:
            self._arenas.pop(arena_id, None)
            self._slots = {h: s for h, s in self._slots.items() if s.arena_id != arena_id}

    def arena_rows(self, arena_id: str) -> torch.Tensor | None:
        with self._lock:
            return self._arenas.get(arena_id)

    def retire(self, arena_id: str, rows: Sequence[int]) -> list[int]:
        with self._lock:
            epochs = []
            for row in rows:
                key = (arena_id, row)
                self._epochs[key] = self._epochs.get(key, 0) + 1
                epochs.append(self._epochs[key])
            return epochs

    def publish(self, arena_id: str, blocks: Sequence[tuple[BlockHash, int, int]]) -> None:
        with self._lock:
            for block_hash, row, epoch in blocks:
                self._slots[block_hash] = LaneSlot(arena_id, row, epoch)

    def lookup(self, hashes: Sequence[BlockHash]) -> list[LaneSlot | None]:
        with self._lock:
            found = [self._slots.get(h) for h in hashes]
            return [
                s if s and self._epochs.get((s.arena_id, s.row)) == s.epoch else None for s in found
            ]

    def epochs(self, slots: Sequence[LaneSlot]) -> list[int]:
        with self._lock:
            return [self._epochs.get((s.arena_id, s.row), 0) for s in slots]

    def mark_taken(self, slots: Sequence[LaneSlot]) -> None:
        with self._lock:
            for slot in slots:
                self._taken[(slot.arena_id, slot.row)] = slot.epoch

    def taken(self, arena_id: str, rows: Sequence[int]) -> list[bool]:
        with self._lock:
            return [
                self._taken.get((arena_id, row), -1) == self._epochs.get((arena_id, row), 0)
                for row in rows
            ]


class RedisLaneIndex(LaneIndex):
    """The index in a store's Redis: processes of one host share the lane through CUDA IPC
    (an arena registered from another host is unreachable, and its blocks come from the
    store). Keys, under the store's namespace prefix: ``lane:arena`` (arena id -> its IPC
    handle, JSON), ``lane:slot`` (block hash -> "arena:row:epoch"), ``lane:epoch`` and
    ``lane:taken`` ("arena:row" -> epoch)."""

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
        self._lock = threading.Lock()
        self._mapped: dict[str, torch.Tensor | None] = {}  # arenas of other processes

    @staticmethod
    def key_names(prefix: str) -> list[str]:
        return [f"{prefix}lane:{name}" for name in _KEY_NAMES]

    def register(self, arena: DeviceArena) -> None:
        handle = export_rows(arena.rows) if arena.rows.is_cuda else {"host": host_id()}
        self._call("hset", self._keys["arena"], arena.arena_id, json.dumps(handle))

    def unregister(self, arena_id: str) -> None:
        self._call("hdel", self._keys["arena"], arena_id)

    def arena_rows(self, arena_id: str) -> torch.Tensor | None:
        if arena_id in _LOCAL_ARENAS:
            return _LOCAL_ARENAS[arena_id]
        with self._lock:
            if arena_id not in self._mapped:
                self._mapped[arena_id] = self._map(arena_id)
            return self._mapped[arena_id]

    def _map(self, arena_id: str) -> torch.Tensor | None:
        raw = self._call("hget", self._keys["arena"], arena_id)
        if raw is None:
            return None
        handle = json.loads(raw)
        if handle.get("host") != host_id() or "handle" not in handle:
            return None
        try:
            return import_rows(handle)
        except RuntimeError:  # no IPC between these devices, or the writer is gone
            return None

    def retire(self, arena_id: str, rows: Sequence[int]) -> list[int]:
        with self._guard():
            pipe = self._client.pipeline(transaction=True)
            for row in rows:
                pipe.hincrby(self._keys["epoch"], f"{arena_id}:{row}", 1)
            return [int(e) for e in pipe.execute()]

    def publish(self, arena_id: str, blocks: Sequence[tuple[BlockHash, int, int]]) -> None:
        if blocks:
            mapping = {h.hex(): f"{arena_id}:{row}:{epoch}" for h, row, epoch in blocks}
            self._call("hset", self._keys["slot"], mapping=mapping)

    def lookup(self, hashes: Sequence[BlockHash]) -> list[LaneSlot | None]:
        if not hashes:
            return []
        values = self._call("hmget", self._keys["slot"], [h.hex() for h in hashes])
        slots = [_parse_slot(v) if v is not None else None for v in values]
        present = [s for s in slots if s is not None]
        current = iter(self.epochs(present))
        return [s if s is not None and next(current) == s.epoch else None for s in slots]

    def epochs(self, slots: Sequence[LaneSlot]) -> list[int]:
        if not slots:
            return []
        values = self._call("hmget", self._keys["epoch"], [f"{s.arena_id}:{s.row}" for s in slots])
        return [int(v or 0) for v in values]

    def mark_taken(self, slots: Sequence[LaneSlot]) -> None:
        if slots:
            mapping = {f"{s.arena_id}:{s.row}": s.epoch for s in slots}
            self._call("hset", self._keys["taken"], mapping=mapping)

    def _call(self, command: str, *args: Any, **kwargs: Any) -> Any:
        with self._guard():
            return getattr(self._client, command)(*args, **kwargs)

    def taken(self, arena_id: str, rows: Sequence[int]) -> list[bool]:
        if not rows:
            return []
        fields = [f"{arena_id}:{row}" for row in rows]
        with self._guard():
            pipe = self._client.pipeline(transaction=False)
            pipe.hmget(self._keys["taken"], fields)
            pipe.hmget(self._keys["epoch"], fields)
            taken, epochs = pipe.execute()
        return [t is not None and int(t) == int(e or 0) for t, e in zip(taken, epochs, strict=True)]


def _parse_slot(value: bytes) -> LaneSlot:
    arena_id, row, epoch = value.decode().split(":")
    return LaneSlot(arena_id, int(row), int(epoch))


def host_id() -> str:
    """This host's name and boot: CUDA IPC handles mean nothing on another host (or after a
    reboot)."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    return f"{socket.gethostname()}/{boot.read_text().strip() if boot.exists() else ''}"


def export_rows(rows: torch.Tensor) -> dict[str, Any]:
    """A JSON-able CUDA IPC handle of a device tensor (no pickle: it travels through Redis),
    for processes of this host only."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(rows)
    # (tensor cls, size, stride, offset, storage cls, dtype, device, handle, storage bytes,
    #  storage offset, requires_grad, ref counter handle, ref counter offset, event handle,
    #  event sync required)
    fields = [args[1], args[2], args[3], *args[6:]]
    encoded = [{"hex": f.hex()} if isinstance(f, bytes) else f for f in fields]
    return {
        "host": host_id(),
        "handle": [list(f) if isinstance(f, torch.Size | tuple) else f for f in encoded],
    }


def import_rows(handle: dict[str, Any]) -> torch.Tensor:
    """The exporter's rows mapped into this process (no copy)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    fields = [bytes.fromhex(f["hex"]) if isinstance(f, dict) else f for f in handle["handle"]]
    size, stride, offset, *rest = fields
    tensor: torch.Tensor = rebuild_cuda_tensor(
        torch.Tensor,
        torch.Size(size),
        tuple(stride),
        offset,
        torch.storage.TypedStorage,
        torch.uint8,
        *rest,
    )
    return tensor
