"""A GGUF file's header read straight into Python values, its tensors as views of a memory map.

``gguf.GGUFReader`` keeps a numpy array for every length and every string of the metadata (two per
vocabulary entry and per merge): a 49k-token vocabulary costs tens of MB of small objects, held
while the weights are copied out beside them. This reads the same layout (gguf's constants, its
value types, its tensor views) into plain values once: ``meta`` is what ``field.contents()`` gives
for every field, ``tensors`` what the loader reads of ``ReaderTensor`` (name, type, ggml-order
shape, the data as gguf shapes it).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
)
from gguf.gguf_reader import READER_SUPPORTED_VERSIONS
from gguf.quants import quant_shape_to_byte_shape

_SCALARS = {  # value type -> struct code (and numpy type, for arrays of them)
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}
_ELEMENT_TYPES = {  # tensor types gguf views element-wise; every other one as bytes
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass
class TensorInfo:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order: the fastest-varying dimension first
    data: np.ndarray  # a view of the file: elements, or for block types [..., bytes per row]


class GGUFHeader:
    def __init__(self, path: str | Path):
        self.data = np.memmap(path, mode="r").view(np.ndarray)
        self._offset = 0
        self._order = "<"
        if self._unpack("<I")[0] != GGUF_MAGIC:
            raise ValueError("GGUF magic invalid")
        (version,) = self._unpack("<I")
        if version & 0xFFFF == 0:  # written for the other byte order
            self._order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in READER_SUPPORTED_VERSIONS:
            raise ValueError(f"GGUF version {version} is not supported")
        n_tensors, n_fields = self._unpack("QQ")
        self.meta: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors}
        self.meta["GGUF.kv_count"] = n_fields
        for _ in range(n_fields):
            key = self._string()
            self.meta[key] = self._value(GGUFValueType(self._unpack("I")[0]))
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = self.meta.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"invalid alignment {alignment!r}: must be a power of two")
        start = -(-self._offset // alignment) * alignment
        self.tensors = [self._tensor(start, *info) for info in infos]
        if len({t.name for t in self.tensors}) != len(self.tensors):
            raise ValueError("duplicated tensor names")

    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        fmt = self._order + fmt.lstrip("<")
        values = struct.unpack_from(fmt, self.data, self._offset)
        self._offset += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (length,) = self._unpack("Q")
        end = self._offset + length
        if end > self.data.size:
            raise ValueError("a string runs past the end of the file")
        text = self.data[self._offset : end].tobytes().decode("utf-8")
        self._offset = end
        return text

    def _value(self, kind: GGUFValueType) -> Any:
        if kind == GGUFValueType.STRING:
            return self._string()
        if kind in _SCALARS:
            return self._unpack(_SCALARS[kind])[0]
        if kind != GGUFValueType.ARRAY:
            raise ValueError(f"unknown field type {kind}")
        item = GGUFValueType(self._unpack("I")[0])
        (count,) = self._unpack("Q")
        if item in _SCALARS:  # one numpy read for the whole array
            dtype = np.dtype(_SCALARS[item]).newbyteorder(self._order)
            end = self._offset + count * dtype.itemsize
            if end > self.data.size:
                raise ValueError("an array runs past the end of the file")
            values = self.data[self._offset : end].view(dtype).tolist()
            self._offset = end
            return values
        values = [self._value(item) for _ in range(count)]
        if item == GGUFValueType.ARRAY:  # gguf flattens nested arrays
            return [v for inner in values for v in inner]
        return values

    def _tensor_info(self) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        name = self._string()
        (n_dims,) = self._unpack("I")
        dims = self._unpack("Q" * n_dims)
        (raw_type,) = self._unpack("I")
        (offset,) = self._unpack("Q")
        return name, dims, GGMLQuantizationType(raw_type), offset

    def _tensor(
        self, start: int, name: str, dims: tuple[int, ...], kind: GGMLQuantizationType, offset: int
    ) -> TensorInfo:
        n = int(np.prod(dims, dtype=np.int64))
        shape = tuple(reversed(dims))
        element = _ELEMENT_TYPES.get(kind)
        if element is None:
            block, block_bytes = GGML_QUANT_SIZES[kind]
            dtype, count = np.dtype(np.uint8), n * block_bytes // block
            shape = quant_shape_to_byte_shape(shape, kind)
        else:
            dtype, count = np.dtype(element).newbyteorder(self._order), n
        first = start + offset
        end = first + count * dtype.itemsize
        if end > self.data.size:
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        return TensorInfo(name, kind, dims, self.data[first:end].view(dtype).reshape(shape))
