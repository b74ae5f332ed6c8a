"""Where a Redis-indexed store keeps block bytes.

The index maps each block to a *payload*, an opaque byte string the data plane wrote: the
block's bytes themselves (``redis``: any host can read them), or the name of a shared-memory
segment (``shm``: zero network copies, one host). The index never looks inside a payload.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Literal

from kvstore import shm

# "p2p": shared memory on the writer's host, served to other hosts over gRPC
# (``kvstore.peer_plane``; the Redis store builds it, since it needs a server).
DataPlaneKind = Literal["redis", "shm", "p2p"]


class DataPlane(ABC):
    """Turns block bytes into index payloads and back."""

    #: Whether payloads of evicted blocks must be handed to ``discard`` (their bytes live
    #: outside Redis); when false the index does not send them back at all.
    holds_external_data: bool = False

    @abstractmethod
    def write(self, block_hash_hex: str, data: bytes) -> bytes:
        """Stores ``data`` where readers can find it and returns the payload to index."""

    @abstractmethod
    def read(self, payload: bytes) -> bytes:
        """The block bytes behind ``payload``; ``KeyError`` if they are gone."""

    def discard(self, payloads: Iterable[bytes]) -> None:  # noqa: B027 - nothing to free
        """Frees the bytes behind payloads the index no longer references."""

    def stored_names(self) -> dict[str, float]:
        """Name -> age in seconds of every object this plane holds for its namespace
        outside Redis (segments, files); empty when the bytes live in Redis."""
        return {}

    def discard_stored(self, names: Iterable[str]) -> None:
        """Frees objects by the names ``stored_names`` gave (no payload at hand)."""
        self.discard(f"{name}:0".encode() for name in names)

    def payload_name(self, payload: bytes) -> str:
        """The name of this host's object behind an external payload (as in
        ``stored_names``); "" when it names none here."""
        return _parse(payload)[0]


class RedisValuePlane(DataPlane):
    """Block bytes are the payload: Redis holds them next to the index."""

    def write(self, block_hash_hex: str, data: bytes) -> bytes:
        return bytes(data)

    def read(self, payload: bytes) -> bytes:
        return payload


class SharedMemoryPlane(DataPlane):
    """Block bytes in one POSIX shared-memory segment each; the payload is
    ``b"<segment name>:<num bytes>"``."""

    holds_external_data = True

    def __init__(self, namespace: str) -> None:
        self._namespace = namespace

    def write(self, block_hash_hex: str, data: bytes) -> bytes:
        name = shm.new_segment_name(self._namespace, block_hash_hex)
        shm.create_segment(name, data)
        return f"{name}:{len(data)}".encode()

    def read(self, payload: bytes) -> bytes:
        name, num_bytes = _parse(payload)
        try:
            return shm.read_segment(name, num_bytes)
        except FileNotFoundError:
            raise KeyError(
                f"shared-memory segment {name} is gone (was /dev/shm cleared, or is this "
                "process on another host than the block's writer?)"
            ) from None

    def discard(self, payloads: Iterable[bytes]) -> None:
        for payload in payloads:
            shm.unlink_segment(_parse(payload)[0])

    def stored_names(self) -> dict[str, float]:
        return shm.segment_ages(self._namespace)


def make_data_plane(kind: DataPlaneKind, namespace: str) -> DataPlane:
    if kind == "redis":
        return RedisValuePlane()
    if kind == "shm":
        return SharedMemoryPlane(namespace)
    raise ValueError(
        f"unknown data plane {kind!r}; expected 'redis' or 'shm' ('p2p' needs a peer server)"
    )


def _parse(payload: bytes) -> tuple[str, int]:
    name, _, num_bytes = payload.decode().rpartition(":")
    return name, int(num_bytes)
