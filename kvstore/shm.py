"""POSIX shared-memory segments that belong to the store, not to the process that made them.

A block's bytes live in their own segment under ``/dev/shm``; the Redis index holds its name.
Any process on the host may create, read or unlink a segment, and the store unlinks it when
the block is evicted.

Python's ``multiprocessing.resource_tracker`` assumes the opposite: it registers every
segment a process creates *or attaches*, and unlinks them (warning about "leaked
shared_memory objects") when that process exits, which would destroy blocks other processes
still index. Registering and then unregistering does not help either: the tracker's table is
one set shared by a whole process tree, so one process's unregister erases another's entry
and the second unregister prints a ``KeyError`` traceback from the tracker (CPython
gh-82300). So store segments are never tracked: Python 3.13+ opens them with
``track=False``; older versions filter the tracker's register/unregister calls for names
under ``SEGMENT_PREFIX`` and pass every other name through unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

SEGMENT_PREFIX = "pdmesh_"
_SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory
_RTYPE = "shared_memory"

_filter_lock = threading.Lock()
_filter_installed = False


def segment_prefix(namespace: str) -> str:
    """Prefix of every segment name of ``namespace``: a digest, since namespaces may hold
    characters a shm name cannot."""
    tag = hashlib.blake2b(namespace.encode(), digest_size=4).hexdigest()
    return f"{SEGMENT_PREFIX}{tag}_"


def new_segment_name(namespace: str, block_hash_hex: str) -> str:
    """A fresh name per stored copy of a block: if a block is evicted and stored again, the
    new copy never collides with an old name another process is still unlinking."""
    return f"{segment_prefix(namespace)}{block_hash_hex}_{secrets.token_hex(8)}"


def segment_ages(namespace: str) -> dict[str, float]:
    """Name -> seconds since last written, for every segment of ``namespace`` on this host."""
    return name_ages(_SHM_DIR, segment_prefix(namespace))


def name_ages(directory: str, prefix: str) -> dict[str, float]:
    """Name -> seconds since last written, for the entries of ``directory`` named
    ``prefix...``."""
    now = time.time()
    ages: dict[str, float] = {}
    try:
        names = [name for name in os.listdir(directory) if name.startswith(prefix)]
    except FileNotFoundError:
        return ages
    for name in names:
        with contextlib.suppress(FileNotFoundError):  # unlinked meanwhile
            ages[name] = now - os.stat(os.path.join(directory, name)).st_mtime
    return ages


def create_segment(name: str, data: bytes) -> None:
    """Creates segment ``name`` holding ``data``; the caller records ``len(data)`` since the
    OS may round a segment's size up."""
    # A zero-size segment cannot be created; one spare byte keeps empty blocks legal.
    shm = _open(name, create=True, size=max(1, len(data)))
    try:
        _buffer(shm)[: len(data)] = data
    except BaseException:
        shm.unlink()  # nobody indexes it yet, so nobody else would
        raise
    finally:
        shm.close()


def read_segment(name: str, num_bytes: int) -> bytes:
    """A private copy of the first ``num_bytes`` of segment ``name``."""
    shm = _open(name, create=False)
    try:
        return _buffer(shm)[:num_bytes].tobytes()
    finally:
        shm.close()


def unlink_segment(name: str) -> None:
    """Removes segment ``name``; processes that still map it keep their mapping. Idempotent."""
    try:
        shm = _open(name, create=False)
    except FileNotFoundError:
        return
    try:
        shm.unlink()
    except FileNotFoundError:
        pass  # another process unlinked it between our open and unlink
    finally:
        shm.close()


def _open(name: str, create: bool, size: int = 0) -> SharedMemory:
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, create=create, size=size, track=False)
    _install_tracker_filter()
    return SharedMemory(name=name, create=create, size=size)


def _buffer(shm: SharedMemory) -> memoryview:
    buf = shm.buf
    if buf is None:  # only after close(); typeshed marks it optional
        raise ValueError(f"shared-memory segment {shm.name} is closed")
    return buf


def _install_tracker_filter() -> None:
    """Makes the resource tracker ignore store segments (Python < 3.13); once per process."""
    global _filter_installed
    with _filter_lock:
        if _filter_installed:
            return
        for attr in ("register", "unregister"):
            setattr(
                resource_tracker, attr, _skipping_store_segments(getattr(resource_tracker, attr))
            )
        _filter_installed = True


def _skipping_store_segments(send: Callable[[str, str], None]) -> Callable[[str, str], None]:
    def filtered(name: str, rtype: str) -> None:
        if rtype == _RTYPE and name.lstrip("/").startswith(SEGMENT_PREFIX):
            return
        send(name, rtype)

    return filtered
