"""Data-plane helpers between store bytes and a device KV cache (tier 0, the engine's).

- ``PinnedStaging``: reusable host rows for blocks on their way to or from the device. On a
  CUDA host the rows are pinned (page-locked), so the host-to-device and device-to-host
  copies run on the copy engine asynchronously instead of through a pageable bounce buffer;
  without CUDA they are ordinary memory and the same code runs (tests, CPU workers).
- CUDA IPC: a device tensor exported by one process and mapped by another process of the
  same host, so blocks move between GPUs (or two processes on one GPU) without the host.
  ``cuda_ipc_available()`` says whether this host can; callers fall back to host copies.

The handle of ``export_cuda_tensor`` is JSON-able data naming device memory of this host:
another host cannot open it (``import_cuda_tensor`` refuses handles of other hosts).
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


class PinnedStaging:
    """``num_rows`` host rows of ``block_bytes`` each, reused for every transfer.

    ``upload`` returns device rows whose copy may still be in flight on the current CUDA
    stream (kernels queued after it on that stream see the data); the staging rows are
    reused only after that copy finished, so a caller may upload again at once."""

    def __init__(self, block_bytes: int, num_rows: int, device: torch.device | str) -> None:
        if block_bytes < 1 or num_rows < 1:
            raise ValueError(f"need block_bytes, num_rows >= 1, got {block_bytes}, {num_rows}")
        self.device = torch.device(device)
        self.block_bytes = block_bytes
        self.is_pinned = self.device.type == "cuda"
        self._rows = torch.empty(
            (num_rows, block_bytes), dtype=torch.uint8, pin_memory=self.is_pinned
        )  # (num_rows, block_bytes)
        self._copied = torch.cuda.Event() if self.is_pinned else None

    @property
    def num_rows(self) -> int:
        return int(self._rows.shape[0])

    def upload(self, blocks: Sequence[bytes | memoryview]) -> torch.Tensor:
        """(len(blocks), block_bytes) uint8 on the device, from store bytes."""
        rows = self._take_rows(len(blocks))
        for row, data in zip(rows, blocks, strict=True):
            if len(data) != self.block_bytes:
                raise ValueError(f"a block has {len(data)} bytes, expected {self.block_bytes}")
            row.numpy()[:] = np.frombuffer(data, dtype=np.uint8)  # one memcpy, read-only ok
        if not self.is_pinned:  # the "device" is host memory: hand out a copy, keep the rows
            return rows.to(self.device, copy=True)
        on_device = rows.to(self.device, non_blocking=True)
        self._mark_copied()
        return on_device

    def download(self, device_rows: torch.Tensor) -> list[bytes]:
        """Store bytes of (n, block_bytes) uint8 device rows; waits for the copy."""
        if device_rows.dim() != 2 or device_rows.shape[1] != self.block_bytes:
            raise ValueError(
                f"expected (n, {self.block_bytes}) rows, got {tuple(device_rows.shape)}"
            )
        rows = self._take_rows(int(device_rows.shape[0]))
        rows.copy_(device_rows, non_blocking=self.is_pinned)
        self._mark_copied()
        if self._copied is not None:
            self._copied.synchronize()
        return [row.numpy().tobytes() for row in rows]

    def _take_rows(self, num_blocks: int) -> torch.Tensor:
        if num_blocks > self.num_rows:
            raise ValueError(f"{num_blocks} blocks exceed the {self.num_rows} staging rows")
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy out of these rows is done
        return self._rows[:num_blocks]

    def _mark_copied(self) -> None:
        if self._copied is not None:
            # On the engine device's stream, which need not be the current device's.
            self._copied.record(torch.cuda.current_stream(self.device))


def cuda_ipc_available() -> bool:
    """CUDA IPC needs CUDA and Linux (the only platform torch shares device memory on)."""
    return sys.platform.startswith("linux") and torch.cuda.is_available()


# A CUDA IPC handle as plain JSON-able data (no pickle: it may travel through Redis).
CudaIpcHandle = dict[str, Any]


def host_id() -> str:
    """This host's name and boot: CUDA IPC handles mean nothing on another host (or after a
    reboot)."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    return f"{socket.gethostname()}/{boot.read_text().strip() if boot.exists() else ''}"


def export_cuda_tensor(tensor: torch.Tensor) -> CudaIpcHandle:
    """A handle another process of this host opens with ``import_cuda_tensor``; the exporter
    must keep ``tensor`` alive while any importer uses it."""
    if not cuda_ipc_available():
        raise RuntimeError("CUDA IPC needs CUDA on Linux; use a host data plane instead")
    if tensor.device.type != "cuda":
        raise ValueError(f"only CUDA tensors can be exported, got one on {tensor.device}")
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(tensor)
    # (tensor cls, size, stride, offset, storage cls, dtype, device, handle, storage bytes,
    #  storage offset, requires_grad, ref counter handle, ref counter offset, event handle,
    #  event sync required): the classes are fixed, the rest is numbers and bytes.
    fields = [list(args[1]), list(args[2]), args[3], *args[6:]]
    return {
        "host": host_id(),
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "fields": [{"hex": f.hex()} if isinstance(f, bytes) else f for f in fields],
    }


def import_cuda_tensor(handle: CudaIpcHandle) -> torch.Tensor:
    """The exporter's device memory, mapped into this process (no copy); RuntimeError where
    it cannot be (another host, no IPC between the devices, the exporter gone)."""
    if handle.get("host") != host_id():
        raise RuntimeError("a CUDA IPC handle of another host (or boot)")
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    fields = [bytes.fromhex(f["hex"]) if isinstance(f, dict) else f for f in handle["fields"]]
    size, stride, offset, *rest = fields
    tensor: torch.Tensor = rebuild_cuda_tensor(
        torch.Tensor,
        torch.Size(size),
        tuple(stride),
        offset,
        torch.storage.TypedStorage,
        getattr(torch, handle["dtype"]),
        *rest,
    )
    return tensor
