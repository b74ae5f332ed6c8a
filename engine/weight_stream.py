"""A ring of device buffers that decoder layers' weights stream through, layer by layer.

Streamed layers run in the same order every forward pass, so loads form one endless sequence
(load c is layer c mod n, into slot c mod depth). Before a layer runs, the compute stream waits
for its load and the layer's parameters are pointed at its slot; after it ran, the slot is
marked free and load c + depth is issued into it, on a side stream, behind the free mark. A
step waits for a layer only when the link is slower than the compute. The ring wraps across
forward passes: the next pass's first streamed layers load while this pass finishes.

On the CPU the same code runs with no streams: each copy is a plain copy.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

#: Files are padded to this, and buffers aligned to it, so O_DIRECT reads are allowed.
DIRECT_ALIGN = 4096
#: One read call moves at most this much (large reads, few system calls).
READ_CHUNK = 64 << 20


class LayerStore(Protocol):
    """Where streamed layers' flat weights wait between passes."""

    def prefetch(self, layer: int, staging: int) -> None: ...

    def host(self, layer: int, staging: int) -> torch.Tensor: ...

    def copied(self, staging: int, done: Any) -> None: ...


class HostLayers:
    """One flat (pinned on CUDA) host tensor per streamed layer."""

    def __init__(self, flats: list[torch.Tensor]) -> None:
        self.flats = flats

    def prefetch(self, layer: int, staging: int) -> None:
        pass

    def host(self, layer: int, staging: int) -> torch.Tensor:
        return self.flats[layer]

    def copied(self, staging: int, done: Any) -> None:
        pass


def host_empty(numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A host tensor of exactly ``numel`` elements, page-locked when ``pin``. Torch's pinned
    allocator rounds every block up to a power of two (a 1.7 GB layer would lock 2 GiB, and
    a 94 GiB host set 118 GiB), so pinned memory is plain memory registered with CUDA in
    place (``cudaHostRegister``), as large as asked for; it stays registered for the life of
    the process."""
    host = torch.empty(numel, dtype=dtype)
    if not pin or numel == 0:
        return host
    nbytes = numel * dtype.itemsize
    error = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), nbytes, 0)
    if int(getattr(error, "value", error)) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed: {error}")
    return host


def host_release(host: torch.Tensor) -> None:
    """Unregisters a ``host_empty(pin=True)`` tensor before its memory is freed."""
    torch.cuda.cudart().cudaHostUnregister(host.data_ptr())


def _padded(nbytes: int) -> int:
    return -(-nbytes // DIRECT_ALIGN) * DIRECT_ALIGN


def aligned_empty(nbytes: int, pin: bool) -> torch.Tensor:
    """A uint8 host buffer whose start is DIRECT_ALIGN-aligned (pinned buffers are pages)."""
    raw = host_empty(nbytes + DIRECT_ALIGN, torch.uint8, pin)
    skip = (-raw.data_ptr()) % DIRECT_ALIGN
    return raw[skip : skip + nbytes]


def read_into(path: Path, buffer: torch.Tensor) -> None:
    """Fills ``buffer`` (uint8, aligned, padded length) from ``path`` with large reads,
    bypassing the page cache (O_DIRECT) where the file system allows it."""
    view = buffer.numpy().data
    flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # tmpfs and some others refuse O_DIRECT
        fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while offset < len(view):
            try:
                got = os.preadv(fd, [view[offset : offset + READ_CHUNK]], offset)
            except OSError:  # O_DIRECT accepted at open but not for this read
                os.close(fd)
                fd = os.open(path, os.O_RDONLY)
                got = os.preadv(fd, [view[offset : offset + READ_CHUNK]], offset)
            if got <= 0:
                raise OSError(f"short read of {path} at {offset}")
            offset += got
    finally:
        os.close(fd)


class DiskLayers:
    """One file per streamed layer; a reader thread fills a ring of aligned (pinned on CUDA)
    staging buffers ahead of the copies that need them."""

    def __init__(
        self, directory: Path, flats: list[torch.Tensor], num_staging: int, pin: bool
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dtype, self.numel = flats[0].dtype, flats[0].numel()
        self.nbytes = self.numel * self.dtype.itemsize
        self.paths = [directory / f"layer_{i:04d}.bin" for i in range(len(flats))]
        padding = bytes(_padded(self.nbytes) - self.nbytes)
        for path, flat in zip(self.paths, flats, strict=True):
            with open(path, "wb") as out:
                out.write(flat.view(torch.uint8).numpy().data)
                out.write(padding)
        self.staging = [aligned_empty(_padded(self.nbytes), pin) for _ in range(num_staging)]
        self.reads: dict[int, Future[None]] = {}
        self.copies: list[Any] = [None] * num_staging
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="layer-reader")

    def _read(self, layer: int, staging: int) -> None:
        done = self.copies[staging]
        if done is not None:  # the previous occupant's copy must have left the buffer
            done.synchronize()
        read_into(self.paths[layer], self.staging[staging])

    def prefetch(self, layer: int, staging: int) -> None:
        self.reads[staging] = self.reader.submit(self._read, layer, staging)

    def host(self, layer: int, staging: int) -> torch.Tensor:
        self.reads.pop(staging).result()
        return self.staging[staging][: self.nbytes].view(self.dtype)

    def copied(self, staging: int, done: Any) -> None:
        self.copies[staging] = done

    def close(self) -> None:
        self.reader.shutdown(wait=True)


def flat_layout(layer: nn.Module) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, offset) of each parameter in a layer's flat buffer."""
    layout, offset = [], 0
    for name, param in layer.named_parameters():
        layout.append((name, tuple(param.shape), offset))
        offset += param.numel()
    return layout


def layout_numel(layout: list[tuple[str, tuple[int, ...], int]]) -> int:
    _, shape, offset = layout[-1]
    return offset + int(torch.Size(shape).numel())


def bind(layer: nn.Module, views: list[torch.Tensor]) -> None:
    for param, view in zip(layer.parameters(), views, strict=True):
        param.data = view


def views_of(flat: torch.Tensor, layout: list[tuple[str, tuple[int, ...], int]]) -> list[Any]:
    return [
        flat[offset : offset + int(torch.Size(shape).numel())].view(shape)
        for _, shape, offset in layout
    ]


class WeightStreamer:
    """Streams ``layers`` (identical layouts, run in this order each pass) through ``depth``
    device slots."""

    def __init__(
        self,
        layers: list[nn.Module],
        store: LayerStore,
        depth: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.layers, self.store, self.depth = layers, store, depth
        self.layout = flat_layout(layers[0])
        numel = layout_numel(self.layout)
        self.slots = [torch.empty(numel, dtype=dtype, device=device) for _ in range(depth)]
        self.slot_views = [views_of(slot, self.layout) for slot in self.slots]
        self.is_cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.is_cuda else None
        self.ready: list[Any] = [None] * depth
        self.free: list[Any] = [None] * depth
        for layer in layers:  # drop the host buffers the weights were loaded into
            bind(layer, self.slot_views[0])
        self.position = {id(layer): i for i, layer in enumerate(layers)}
        self.slot_of: dict[int, int] = {}
        #: Seconds the compute stream was made to wait is not measured (it would need a
        #: sync); ``num_loads`` counts layer loads for benchmarks' bytes-moved figures.
        self.num_loads = 0
        self.bytes_per_layer = numel * dtype.itemsize
        for load in range(depth):
            store.prefetch(load % len(layers), load)
        self.next_load = 0
        for _ in range(depth):
            self._issue()
        self.handles = [
            handle
            for layer in layers
            for handle in (
                layer.register_forward_pre_hook(self._before),
                layer.register_forward_hook(self._after),
            )
        ]

    def _issue(self) -> None:
        load = self.next_load
        self.next_load += 1
        layer, slot = load % len(self.layers), load % self.depth
        host = self.store.host(layer, slot)
        if self.copy_stream is None:
            self.slots[slot].copy_(host)
        else:
            with torch.cuda.stream(self.copy_stream):
                if self.free[slot] is not None:
                    self.copy_stream.wait_event(self.free[slot])
                self.slots[slot].copy_(host, non_blocking=True)
                self.ready[slot] = torch.cuda.Event()
                self.ready[slot].record(self.copy_stream)
        self.store.copied(slot, self.ready[slot])
        self.store.prefetch((load + self.depth) % len(self.layers), slot)
        self.slot_of[layer] = slot
        self.num_loads += 1

    def _before(self, layer: nn.Module, args: Any) -> None:
        slot = self.slot_of[self.position[id(layer)]]
        if self.ready[slot] is not None:
            torch.cuda.current_stream(self.slots[slot].device).wait_event(self.ready[slot])
        bind(layer, self.slot_views[slot])

    def _after(self, layer: nn.Module, args: Any, output: Any) -> None:
        slot = self.slot_of[self.position[id(layer)]]
        if self.is_cuda:
            self.free[slot] = torch.cuda.Event()
            self.free[slot].record(torch.cuda.current_stream(self.slots[slot].device))
        self._issue()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        close = getattr(self.store, "close", None)
        if close is not None:
            close()
