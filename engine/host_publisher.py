"""Writes finished requests' blocks to the store off the engine's thread (GPU workers).

Reading blocks out to host memory runs at a few GB/s (pinned staging into ``bytes``): on a GPU
an 8k-token request's 1 GiB would stall the decode loop for most of a second. Instead the
engine thread gathers the blocks into one fresh device tensor (a device copy, after which
the request's cache blocks may be reused) and queues it here; a worker thread copies it to
pinned host memory on a side stream (the copy engine, while the next steps compute), turns
the rows into block bytes and puts them in the store, unpinned. The queue holds at most
``max_bytes`` of device copies; past that a retention is skipped, as a full store skips it
(so is a request whose blocks alone exceed it).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvstore.base import KVStore
from kvstore.block_hash import BlockHash
from kvstore.errors import StoreFullError, StoreUnavailableError

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    owner: str
    hashes: list[BlockHash]
    rows: torch.Tensor  # (num_blocks, block bytes) uint8 on the device, a private copy
    ready: torch.cuda.Event | None  # when the gather that filled ``rows`` is done


class HostPublisher:
    def __init__(
        self,
        store: KVStore,
        device: torch.device,
        max_bytes: int,
        on_stored: Callable[[int], None] = lambda num_blocks: None,
    ) -> None:
        self.store = store
        self.device = device
        self.max_bytes = max_bytes
        #: Called on the worker thread with the number of blocks each finished put stored.
        self.on_stored = on_stored
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Condition()
        self._queued_bytes = 0
        self._thread = threading.Thread(target=self._run, name="kv-host-publisher", daemon=True)
        self._thread.start()

    def submit(self, owner: str, hashes: list[BlockHash], rows: torch.Tensor) -> bool:
        """Queues ``rows`` (a private device copy, still being written by the current stream)
        for the store; False when the queue is full (the caller skips this retention)."""
        with self._lock:
            if self._queued_bytes + rows.nbytes > self.max_bytes:
                return False
            self._queued_bytes += rows.nbytes
        ready = None
        if self._stream is not None:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        self._jobs.put(_Job(owner, hashes, rows, ready))
        return True

    def flush(self) -> None:
        """Returns once every queued job is in the store (tests, shutdown)."""
        with self._lock:
            self._lock.wait_for(lambda: self._queued_bytes == 0)

    def close(self) -> None:
        self.flush()
        self._jobs.put(None)
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._store(job)
            except (StoreFullError, StoreUnavailableError) as error:
                logger.info("not retaining %s: %s", job.owner, error)
            except Exception:  # a failed retention must not stop later ones
                logger.exception("retaining %s failed", job.owner)
            finally:
                with self._lock:
                    self._queued_bytes -= job.rows.nbytes
                    self._lock.notify_all()
                del job  # its device copy goes now, not when the next job comes

    def _store(self, job: _Job) -> None:
        host = self._to_host(job)
        data = [bytes(row.numpy()) for row in host]
        try:
            self.store.put(job.owner, list(zip(job.hashes, data, strict=True)))
        finally:
            self.store.release(job.owner)
        self.on_stored(len(data))

    def _to_host(self, job: _Job) -> torch.Tensor:
        if self._stream is None or job.ready is None:
            return job.rows.cpu()
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(job.ready)
            host = torch.empty(job.rows.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(job.rows, non_blocking=True)
            job.rows.record_stream(self._stream)  # freed only after this stream's copy
        self._stream.synchronize()
        return host
