"""Quantized weight matrices kept in their GGUF block formats, for native execution.

A ``QuantizedTensor`` holds a [N, K] matrix of one of the GGUF block formats that flashdecode runs
without dequantizing (``NATIVE_FORMATS``), split into planes that SIMD kernels load directly:

    Q4_0  qs uint8 [N, K/32, 16]  d fp16 [N, K/32]                 w = d * (q - 8)
    Q4_1  qs uint8 [N, K/32, 16]  d fp16 [N, K/32]  m fp16 [...]    w = d * q + m
    Q8_0  qs uint8 [N, K/32, 32]  d fp16 [N, K/32]                 w = d * int8(q)
    Q4_K  qs uint8 [N, K/32, 16]  d fp32 [N, K/32]  m fp32 [...]    w = d * q + m
    Q5_K  qs uint8 [N, K/32, 32]  d fp32 [N, K/32]  m fp32 [...]    w = d * q + m   (q = 0..31)
    Q6_K  qs uint8 [N, K/32, 32]  d fp32 [N, K/16]                 w = d * int8(q) (q = -32..31)
    Q2_K  qs uint8 [N, K/32, 16]  d fp32 [N, K/16]  m fp32 [...]    w = d * q + m   (q = 0..3)

(in a 4-bit block, byte j holds element j in its low nibble and element j + 16 in its high nibble).
The first three (``BYTE_FORMATS``) are the file's bytes split, never rounded: ``to_gguf_blocks`` gives
them back. The K-quants (``REPACKED_FORMATS``) store 256-element super-blocks with two-level scales
(an fp16 scale times a 4-, 6- or 8-bit sub-scale); they are repacked at load into the planes above,
with the products d * sc and dmin * min taken in fp32, where they are exact (at most 11 + 8
significant bits), so ``w = d * q + m`` is the one rounding gguf's own dequantization makes (Q2_K's
sub-blocks of 16 keep a scale and a min each: gguf's d * sc * q - dmin * mn is exactly
d * q + m with m = -(dmin * mn), since a - b and a + (-b) are the same IEEE operation). Either way
``dequantize`` gives bit for bit what ``gguf.quants.dequantize`` gives.

``quantize`` makes these formats from float weights (``quantization="int8"`` -> Q8_0, ``"int4"`` ->
Q4_1, group size 32), so float checkpoints run on the same kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType
from gguf.quants import Q4_K
from gguf.quants import dequantize as gguf_dequantize

from ..kernels import cpu, reference
from ..kernels.formats import (
    BLOCK,
    BYTE_FORMATS,
    LOADED_NATIVE,
    NATIVE,
    NATIVE_FORMATS,
    QK_K,
    REPACKED_FORMATS,
    REPACKED_INTO,
    block_size,
)

QUANTIZATION_FORMATS = {"int8": "Q8_0", "int4": "Q4_1"}  # load-time quantization of float weights


@dataclass
class QuantizedTensor:
    format: str
    qs: torch.Tensor  # uint8 [N, K/32, 16 or 32]
    d: torch.Tensor  # float16 [N, K/32]; K-quants: float32 [N, K/32] (Q6_K, Q2_K: [N, K/16])
    m: torch.Tensor | None = None  # Q4_1: float16 [N, K/32]; Q4_K, Q5_K, Q2_K: float32, shaped as d

    def __post_init__(self) -> None:
        fmt = self.format
        layout = NATIVE.get(fmt)
        if layout is None:
            raise ValueError(f"{fmt} has no native kernel; expected one of {NATIVE_FORMATS}")
        if self.qs.dim() != 3 or self.qs.shape[2] != layout.qs_bytes or self.qs.dtype != torch.uint8:
            raise ValueError(f"{fmt}: qs has shape {tuple(self.qs.shape)}, dtype {self.qs.dtype}")
        n, nb = self.qs.shape[:2]
        scale_dtype = getattr(torch, layout.scale_dtype)
        if self.d.shape != (n, nb * layout.scales_per_block) or self.d.dtype != scale_dtype:
            raise ValueError(f"{fmt}: d has shape {tuple(self.d.shape)}, dtype {self.d.dtype}")
        if (self.m is not None) != layout.has_min:
            raise ValueError(f"{fmt}: m is {'missing' if self.m is None else 'unexpected'}")
        if self.m is not None and (self.m.shape != self.d.shape or self.m.dtype != scale_dtype):
            raise ValueError(f"{fmt}: m has shape {tuple(self.m.shape)}, dtype {self.m.dtype}")
        self.qs = self.qs.contiguous()
        self.d = self.d.contiguous()
        self.m = None if self.m is None else self.m.contiguous()

    # --- shape -----------------------------------------------------------------------------------

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.qs.shape[0], self.qs.shape[1] * BLOCK))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    def dim(self) -> int:
        return 2

    def numel(self) -> int:
        n, k = self.shape
        return n * k

    # --- GGUF blocks -----------------------------------------------------------------------------

    @classmethod
    def from_gguf_blocks(
        cls, fmt: str, raw: np.ndarray | torch.Tensor, shape: Sequence[int]
    ) -> QuantizedTensor:
        """Split a [N, K] tensor's raw GGUF blocks (any uint8 array holding its blocks) into planes;
        a type in ``REPACKED_INTO`` comes back in the native layout that holds it exactly."""
        if fmt not in LOADED_NATIVE:
            raise ValueError(f"{fmt} has no native kernel")
        n, k = (int(s) for s in shape)
        if fmt in REPACKED_INTO:
            return _repack_into_layout(fmt, np.asarray(raw).view(np.uint8), n, k)
        block_bytes = block_size(fmt)[1]
        block = QK_K if fmt in REPACKED_FORMATS else BLOCK
        if k % block:
            raise ValueError(f"{fmt}: row length {k} is not a multiple of {block}")
        if fmt in REPACKED_FORMATS:
            raw = np.asarray(raw).view(np.uint8).reshape(-1)
            if raw.size != n * (k // QK_K) * block_bytes:
                raise ValueError(f"{fmt}: {raw.size} bytes for a [{n}, {k}] tensor")
            return _repack_k_quant(fmt, raw.reshape(n * (k // QK_K), block_bytes), n, k)
        nb = k // BLOCK
        blocks = np.asarray(raw).view(np.uint8)
        if blocks.size != n * nb * block_bytes:
            raise ValueError(f"{fmt}: {blocks.size} bytes for a [{n}, {k}] tensor")
        blocks = blocks.reshape(n, nb, block_bytes)

        def plane(first: int, end: int | None = None) -> torch.Tensor:
            """Bytes [first, end) of every block, copied straight out of ``raw`` (a memory-mapped file:
            the planes are the only copy the load makes)."""
            return torch.from_numpy(blocks[..., first:end].copy())

        d = plane(0, 2).view(torch.float16).reshape(n, nb)
        if fmt == "Q4_1":
            return cls(fmt, plane(4), d, plane(2, 4).view(torch.float16).reshape(n, nb))
        return cls(fmt, plane(2), d)

    def to_gguf_blocks(self) -> np.ndarray:
        """The GGUF bytes back, [N, K/32 * block bytes] uint8 (``BYTE_FORMATS`` only: a K-quant's
        two-level scales were multiplied out at load)."""
        if self.format not in BYTE_FORMATS:
            raise ValueError(f"{self.format} is repacked at load; its file bytes are not kept")
        n, nb = self.d.shape
        parts = [self.d.contiguous().view(torch.uint8).reshape(n, nb, 2)]
        if self.m is not None:
            parts.append(self.m.contiguous().view(torch.uint8).reshape(n, nb, 2))
        parts.append(self.qs)
        return torch.cat(parts, dim=-1).reshape(n, -1).numpy()

    # --- float views -----------------------------------------------------------------------------

    def planes(self) -> reference.Planes:
        return self.qs, self.d, self.m

    def _dequant_torch(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is None:
            return reference.dequantize(self.format, *self.planes())
        m = None if self.m is None else self.m[rows]
        return reference.dequantize(self.format, self.qs[rows], self.d[rows], m)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float matrix, bit-exact with ``gguf.quants.dequantize`` in fp32."""
        lib = cpu.load() if self.qs.device.type == "cpu" else None
        out = lib.dequant(self.format, self.planes(), dtype=dtype) if lib is not None else None
        return self._dequant_torch().to(dtype) if out is None else out

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantized rows ``W[ids]`` (an embedding lookup), shaped ``ids.shape + (K,)``."""
        flat = ids.reshape(-1).long()
        return self._dequant_torch(flat).to(dtype).reshape(*ids.shape, self.shape[1])

    # --- row surgery -----------------------------------------------------------------------------

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedTensor:
        """Apply a function that rearranges dim 0 (rows), whatever the trailing dims, to every plane."""
        return QuantizedTensor(self.format, fn(self.qs), fn(self.d), None if self.m is None else fn(self.m))

    def columns(self, first: int, end: int) -> QuantizedTensor:
        """Blocks ``first`` to ``end`` - 1 of every row (K from ``first * 32``): exact, since no block
        is cut."""
        per = self.d.shape[1] // self.qs.shape[1]  # scales per block (Q6_K: two)
        m = None if self.m is None else self.m[:, first:end]
        return QuantizedTensor(self.format, self.qs[:, first:end], self.d[:, first * per : end * per], m)

    @staticmethod
    def cat(parts: Sequence[QuantizedTensor]) -> QuantizedTensor:
        fmt = parts[0].format
        if any(p.format != fmt or p.shape[1] != parts[0].shape[1] for p in parts):
            raise ValueError("only matrices of one format and row length can be concatenated")
        m = None if parts[0].m is None else torch.cat([p.m for p in parts])
        return QuantizedTensor(fmt, torch.cat([p.qs for p in parts]), torch.cat([p.d for p in parts]), m)

    def share_rows_of(self, whole: QuantizedTensor, first: int) -> None:
        """Become a view of rows ``first`` onwards of ``whole`` (which holds these same blocks there,
        as ``cat`` made it): the rows are then held once, however many hold the two."""
        n = self.shape[0]
        rows = (whole.qs, whole.d, whole.m)
        self.qs, self.d, self.m = (None if t is None else t[first : first + n] for t in rows)

    @property
    def device(self) -> torch.device:
        return self.qs.device

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """The same blocks on ``device`` (a float cast has no meaning for blocks: only devices)."""
        return self.map_rows(lambda plane: plane.to(device))


def _repack_k_quant(fmt: str, blocks: np.ndarray, n: int, k: int) -> QuantizedTensor:
    """K-quant super-blocks [N * K/256, bytes] into planes, unpacking the values and scales the way
    ``gguf.quants`` does (its ``get_scale_min`` reads the 6-bit scales)."""
    count = blocks.shape[0]

    def bits(packed: np.ndarray, width: int, shifts: list[int], mask: int) -> np.ndarray:
        """Runs of ``width`` bytes, each read at every shift in turn, as [count, values / 32, 32]."""
        runs = packed.reshape(count, -1, 1, width) >> np.array(shifts, dtype=np.uint8).reshape(1, 1, -1, 1)
        return (runs & mask).reshape(count, -1, 32)

    if fmt == "Q6_K":
        ql, qh, sc, d = np.split(blocks, [128, 192, 208], axis=1)  # 4 + 2 bits per value, 16 scales, d
        q = (bits(ql, 64, [0, 4], 0x0F) | (bits(qh, 32, [0, 2, 4, 6], 0x03) << 4)).astype(np.int8) - 32
        scale = d.copy().view(np.float16).astype(np.float32) * sc.copy().view(np.int8).astype(np.float32)
        qs_t = torch.from_numpy(q.view(np.uint8).reshape(n, k // BLOCK, 32))
        return QuantizedTensor(fmt, qs_t, torch.from_numpy(scale.reshape(n, -1)))
    if fmt == "Q2_K":  # 16 bytes of 4-bit scale | 4-bit min << 4, 2 bits per value, then d, dmin
        sc, qs2, d, dmin = np.split(blocks, [16, 80, 82], axis=1)
        d, dmin = (a.copy().view(np.float16).astype(np.float32) for a in (d, dmin))
        scale, mins = d * (sc & 0x0F).astype(np.float32), dmin * (sc >> 4).astype(np.float32)
        q = bits(qs2, 32, [0, 2, 4, 6], 0x03)
        low = -mins  # exact: an fp16 times a 4-bit integer, negated
    else:
        d, dmin = (blocks[:, i : i + 2].copy().view(np.float16).astype(np.float32) for i in (0, 2))
        sc, mins = Q4_K.get_scale_min(blocks[:, 4:16].copy())
        scale = d * sc.astype(np.float32)
        low = -(dmin * mins.astype(np.float32))  # exact: an fp16 times a 6-bit integer
        q = bits(blocks[:, -128:], 32, [0, 4], 0x0F)
    if fmt == "Q5_K":
        q = q | (bits(blocks[:, 16:48], 32, list(range(8)), 0x01) << 4)
    else:
        q = q[..., :16] | (q[..., 16:] << 4)  # element j low nibble, j + 16 high, as Q4_1 (and Q2_K)
    planes = (np.ascontiguousarray(a) for a in (q, scale, low))
    qs_t, d_t, m_t = (torch.from_numpy(a) for a in planes)
    return QuantizedTensor(fmt, qs_t.reshape(n, k // BLOCK, -1), d_t.reshape(n, -1), m_t.reshape(n, -1))


def _repack_into_layout(fmt: str, raw: np.ndarray, n: int, k: int) -> QuantizedTensor:
    """A type of ``REPACKED_INTO`` in its native layout. The integer values and the scales are read by
    ``gguf``'s own dequantization of blocks whose other fields are overwritten with ones (a unit
    scale, unit sub-scales, unit values), so every bit layout is gguf's; scales multiply out
    exactly, so the planes give back bit for bit what ``gguf.quants.dequantize`` gives."""
    elements, block_bytes = block_size(fmt)
    if k % elements or raw.size != n * (k // elements) * block_bytes:
        raise ValueError(f"{fmt}: {raw.size} bytes for a [{n}, {k}] tensor")
    blocks = raw.reshape(-1, block_bytes)
    qtype = GGMLQuantizationType[fmt]

    def decoded(**fields: int | float) -> np.ndarray:
        """gguf's dequantization of the blocks with byte ranges overwritten: name=(start, value)."""
        b = blocks.copy()
        for (start, stop), value in fields.values():
            if isinstance(value, float):
                b[:, start:stop] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
            else:
                b[:, start:stop] = value
        return gguf_dequantize(b, qtype).reshape(n, k // BLOCK, BLOCK)

    one = ((0, 2), 1.0)  # d = 1 (every type here leads with d but Q3_K, which ends with it)
    if fmt in ("Q5_0", "Q5_1", "IQ4_NL"):
        d = blocks[:, 0:2].copy().view(np.float16).reshape(n, k // BLOCK)
        if fmt == "IQ4_NL":  # d * table[q]: the table's int8 values as Q8_0's
            q = decoded(d=one).astype(np.int8)
            return QuantizedTensor("Q8_0", torch.from_numpy(q.view(np.uint8)), torch.from_numpy(d))
        if fmt == "Q5_0":  # d * (q - 16) = d * q + (-16 d), both terms exact in fp32
            q = decoded(d=one) + 16
            m = -16 * d.astype(np.float32)
        else:
            q = decoded(d=one, m=((2, 4), 0.0))
            m = blocks[:, 2:4].copy().view(np.float16).reshape(n, k // BLOCK).astype(np.float32)
        planes = (q.astype(np.uint8), d.astype(np.float32), m)
        return QuantizedTensor("Q5_K", *(torch.from_numpy(np.ascontiguousarray(a)) for a in planes))
    if fmt == "Q3_K":  # hmask 32 B, qs 64 B, 12 B of 6-bit sub-scales (each 33: unit), d last
        q = decoded(s=((96, 104), 0x11), h=((104, 108), 0xAA), d=((108, 110), 1.0))
        scale = decoded(m=((0, 32), 0xFF), q=((32, 96), 0x55))[..., ::16]  # every value 1: d * sc
    else:  # IQ4_XS: d, 2 B of high and 4 B of low sub-scale bits (each 33: unit), 4-bit table indices
        q = decoded(d=one, h=((2, 4), 0xAA), lo=((4, 8), 0x11))
        scale = decoded(q=((8, 136), 0x88))[..., ::16]  # table index 8 holds 1: the scale per 32
    planes = (q.astype(np.int8).view(np.uint8), scale.reshape(n, -1).astype(np.float32))
    return QuantizedTensor("Q6_K", *(torch.from_numpy(np.ascontiguousarray(a)) for a in planes))


def quantize(weight: torch.Tensor, fmt: str) -> QuantizedTensor:
    """A float [N, K] matrix quantized group-wise into a native byte format (llama.cpp's rounding)."""
    return QuantizedTensor(fmt, *reference.quantize(weight, fmt))


def prepare_weights(
    weights: dict[str, torch.Tensor | QuantizedTensor],
    dtype: torch.dtype,
    matrices: set[str],
    quantization: str | None = None,
    keep_blocks: bool = True,
) -> dict[str, torch.Tensor | QuantizedTensor]:
    """The decoder's weights: float tensors cast to the compute ``dtype``; GGUF blocks kept as they
    are; with ``quantization`` ("int8" -> Q8_0, "int4" -> Q4_1), the float ``matrices`` whose rows are
    a multiple of 32 long quantized group-wise. Without ``keep_blocks`` (no kernel runs them: the
    native build failed, with a warning), blocks are dequantized here once, so the model still runs."""
    if quantization is not None and quantization not in QUANTIZATION_FORMATS:
        raise ValueError(
            f"quantization={quantization!r}: expected None or one of {sorted(QUANTIZATION_FORMATS)}"
        )
    out: dict[str, torch.Tensor | QuantizedTensor] = {}
    for name, t in weights.items():
        if isinstance(t, QuantizedTensor):
            out[name] = t if keep_blocks else t.dequantize().to(dtype)
        elif quantization and keep_blocks and name in matrices and t.shape[1] % BLOCK == 0:
            out[name] = quantize(t, QUANTIZATION_FORMATS[quantization])
        else:
            out[name] = t.to(dtype)
    return out
