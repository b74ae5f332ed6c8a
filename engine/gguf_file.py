"""A GGUF file's metadata and tensor index, read in milliseconds.

``gguf.GGUFReader`` builds a numpy view for every part of every metadata field; a model
with a 49k-token vocabulary and its merges takes it about 5 s of CPU, paid by every process
that loads the model (each engine core, the gateway, each test engine). This reads the same
header sequentially with ``struct``, decodes the values once, and maps each tensor's bytes
from the file exactly as the reader does (so ``gguf.dequantize`` takes them unchanged).
Little-endian files only (what llama.cpp writes); the format is
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# Value type codes -> struct format of a scalar.
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
# ggml tensor types stored as plain numpy element types; the others are quantized blocks.
_PLAIN = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64,
          28: np.float64}  # fmt: skip


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    #: ``gguf.GGMLQuantizationType`` of the data.
    tensor_type: Any
    #: ggml order (innermost first), as in the file.
    shape: tuple[int, ...]
    #: The bytes in the file, shaped as ``gguf.GGUFReader`` shapes them.
    data: np.ndarray


class GGUFFile:
    """``fields``: metadata key -> value (ints, floats, bools, str, lists); ``tensors``: in
    file order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._buffer = np.memmap(path, dtype=np.uint8, mode="r")
        self._view = memoryview(self._buffer)  # type: ignore[arg-type]
        self._offset = 0
        if bytes(self._view[:4]) != MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        self._offset = 4
        version, num_tensors, num_fields = self._unpack("<IQQ")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} (a big-endian file?) is unsupported")
        self.fields: dict[str, Any] = {}
        for _ in range(num_fields):
            key = self._string()
            self.fields[key] = self._value(self._unpack("<I")[0])
        infos = [self._tensor_info() for _ in range(num_tensors)]
        alignment = int(self.fields.get("general.alignment", DEFAULT_ALIGNMENT))
        start = -(-self._offset // alignment) * alignment
        self.tensors = [self._tensor(start, *info) for info in infos]

    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from(fmt, self._view, self._offset)
        self._offset += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (length,) = struct.unpack_from("<Q", self._view, self._offset)
        start = self._offset + 8
        self._offset = start + length
        return bytes(self._view[start : self._offset]).decode("utf-8")

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item_kind, count = self._unpack("<IQ")
            if item_kind in _SCALARS:  # one read for the whole array
                fmt = "<" + _SCALARS[item_kind] * count
                return list(self._unpack(fmt)) if count else []
            return [self._value(item_kind) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"{self.path}: unknown GGUF value type {kind}")
        return self._unpack("<" + _SCALARS[kind])[0]

    def _tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string()
        (num_dims,) = self._unpack("<I")
        dims = self._unpack("<" + "Q" * num_dims)
        kind, offset = self._unpack("<IQ")
        return name, tuple(int(d) for d in dims), kind, offset

    def _tensor(
        self, start: int, name: str, dims: tuple[int, ...], kind: int, offset: int
    ) -> GGUFTensor:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        qtype = GGMLQuantizationType(kind)
        shape = tuple(reversed(dims))  # numpy order
        count = int(np.prod(dims))
        begin = start + offset
        if kind in _PLAIN:
            dtype = np.dtype(_PLAIN[kind])
            data = self._buffer[begin : begin + count * dtype.itemsize].view(dtype).reshape(shape)
        else:
            block, size = GGML_QUANT_SIZES[qtype]
            raw = self._buffer[begin : begin + count * size // block]
            data = raw.reshape(quant_shape_to_byte_shape(shape, qtype))
        return GGUFTensor(name, qtype, dims, data)


@functools.lru_cache(maxsize=2)
def open_gguf(path: Path) -> GGUFFile:
    """One index per file and process (the config and the weights both read it)."""
    return GGUFFile(path)
