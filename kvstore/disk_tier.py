"""The disk tier's data plane: one file per block in a directory (NVMe, or a shared mount).

Files are named like shared-memory segments (namespace digest, block hash, a fresh token per
stored copy), so a copy that is being unlinked never collides with a new one, and a sweep can
tell a namespace's files from anything else in the directory. No fsync: the tier is a cache,
and a block lost with the page cache is recomputed, never read wrong (a reader gets KeyError).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from kvstore.data_planes import DataPlane
from kvstore.shm import name_ages, segment_prefix


class DiskFilePlane(DataPlane):
    """Block bytes in files under ``directory``; the payload is ``b"<file name>:<size>"``."""

    holds_external_data = True

    def __init__(self, directory: Path, namespace: str) -> None:
        self.directory = directory
        self._prefix = segment_prefix(namespace)
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, block_hash_hex: str, data: bytes) -> bytes:
        name = f"{self._prefix}{block_hash_hex}_{secrets.token_hex(8)}"
        fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        return f"{name}:{len(data)}".encode()

    def read(self, payload: bytes) -> bytes:
        name, _, size = payload.decode().rpartition(":")
        try:
            with open(self.directory / name, "rb", buffering=0) as file:
                data = file.read(int(size))
        except FileNotFoundError:
            raise KeyError(
                f"disk block file {name} is gone from {self.directory} (moved to DRAM "
                "meanwhile, or is this host not the one whose disk holds it?)"
            ) from None
        if len(data) != int(size):
            raise KeyError(f"disk block file {name} is truncated: {len(data)} of {size} bytes")
        return data

    def discard(self, payloads: Iterable[bytes]) -> None:
        for payload in payloads:
            name = payload.decode().rpartition(":")[0]
            (self.directory / name).unlink(missing_ok=True)

    def stored_names(self) -> dict[str, float]:
        return name_ages(str(self.directory), self._prefix)

    def file_names(self) -> list[str]:
        """This namespace's block files that exist now (tests count them for leaks)."""
        if not self.directory.is_dir():
            return []
        return sorted(n for n in os.listdir(self.directory) if n.startswith(self._prefix))
