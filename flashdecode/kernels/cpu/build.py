"""The native CPU kernels (flat_gemm.c and decode_step.c beside this file): built at first use into one
library, loaded with ctypes.

The C source has no Python or torch dependency. It is compiled with the system C compiler into the
user cache directory (``$FLASHDECODE_CACHE_DIR``, else ``$XDG_CACHE_HOME/flashdecode``, else
``~/.cache/flashdecode``), under a name keyed by the source, the flags and the compiler, so an edit or
a compiler upgrade rebuilds and concurrent processes never see a half-written library.

The instruction set is probed before anything runs: the AVX-512 build is used only on a CPU whose
/proc/cpuinfo lists every extension it was compiled for, then AVX2, then a portable build with no
ISA flags. Each build passes a numerical self-test before it is used. If no build works (no
compiler, a sandbox without exec...), ``load()`` returns None with one warning and the engine runs
on torch kernels. ``FLASHDECODE_NATIVE=0`` disables the native kernels; ``FLASHDECODE_REQUIRE_NATIVE=1``
(set by CI) turns a missing build into an error instead, so a suite cannot pass without them.
Where the CPU and OS offer AMX, the int8-activation products of 16 rows or more run on its tiles
(the same bits as without); ``FLASHDECODE_AMX=0`` keeps them on AVX512-VNNI.
Built libraries go to ``$FLASHDECODE_KERNEL_DIR``, else ``kernels/`` in the cache directory: a build
is keyed by its source, so it may be shared where tuned tables must not be (the tests do).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ...utils.cpuinfo import cpu_flags
from ...utils.paths import cache_dir
from .. import reference
from ..formats import BF16_KERNEL_ID, I8_FORMATS, NATIVE

HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "flat_gemm.c", HERE / "decode_step.c")
HEADERS = (HERE / "flat_gemm.h",)
ABI_VERSION = 8
FORMAT_IDS = {"BF16": BF16_KERNEL_ID} | {fmt: layout.kernel_id for fmt, layout in NATIVE.items()}
FORMAT_IDS["Q5_0"] = 8  # repack_i8's lean Q5_K: Q5_0's fp16 scales, min -16 d (flat_gemm.h FD_Q5_0_I8)
# repack_i8's lean K-quants: the file's integer sub-scales and fp16 super-scales (flat_gemm.h)
FORMAT_IDS["Q6_K_I8"] = 9
FORMAT_IDS["Q4_K_I8"] = 10
# a lean repack's integer sub-scales: dtype, range, and the largest magnitude the file's own use
# (llama.cpp's quantizers map a super-block's largest scale there: Q6_K -128, Q4_K 63)
LEAN_SUBSCALES = {"Q6_K": (torch.int8, -128, 127, 128), "Q4_K": (torch.uint8, 0, 255, 63)}
Planes = reference.Planes

# build name -> (cpuinfo flags the build needs, compiler flags)
ISA_BUILDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "avx512": (
        ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"),
        ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"),
    ),
    "avx2": (("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c")),
    "generic": ((), ()),
}
BASE_FLAGS = ("-O3", "-fPIC", "-shared", "-std=c11", "-fno-math-errno")

_lock = threading.Lock()
_state: dict[str, NativeKernels | None] = {}


def _f32(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


@dataclass
class NativeKernels:
    lib: ctypes.CDLL
    isa: str
    path: Path

    def __post_init__(self) -> None:
        i64, vp, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        self.lib.fd_linear.argtypes = [i32, vp, i64, i64, i64, vp, vp, vp, vp, vp, i64, i64, i32]
        self.lib.fd_linear.restype = i32
        self.lib.fd_dequant.argtypes = [i32, vp, vp, vp, i64, i64, vp, i64, vp, i32, i32]
        self.lib.fd_dequant.restype = i32
        self.lib.fd_linear_i8.argtypes = [i32, vp, i64, i64, i64, vp, vp, vp, vp, vp, i64, i64, i32]
        self.lib.fd_linear_i8.restype = i32
        self.lib.fd_i8_available.restype = i32
        self.lib.fd_linear_q8.argtypes = self.lib.fd_linear.argtypes
        self.lib.fd_linear_q8.restype = i32
        self.lib.fd_q8_available.restype = i32
        self.lib.fd_sample.argtypes = [vp, i64, i64, i64, vp, vp, vp]
        self.lib.fd_sample.restype = i32
        self.lib.fd_amx.argtypes = [i32]
        self.lib.fd_amx.restype = i32
        self.lib.fd_amx_available.restype = i32
        self._linear_i8 = self.lib.fd_linear_i8
        self._dequant = self.lib.fd_dequant
        self.has_i8 = bool(self.lib.fd_i8_available())
        self.has_q8 = bool(self.lib.fd_q8_available())
        self.has_amx = bool(self.lib.fd_amx_available())

    def set_amx(self, on: bool | None = None) -> bool:
        """Whether ``linear_i8`` (and the decode step's int8 products) run on AMX tiles where they can
        (16 rows or more, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q5_0): ``on`` switches it for the whole process
        (None: unchanged), never on where ``has_amx`` is False. The results are the same bits either way."""
        return bool(self.lib.fd_amx(-1 if on is None else int(on)))

    def linear(
        self,
        fmt: str,
        x: torch.Tensor,
        planes: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None],
        n: int,
        bias: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        int8_activations: bool = False,
    ) -> torch.Tensor:
        """y = x W^T (+ bias) in fp32 for a 2-D fp32 ``x`` [M, K] with unit column stride. ``planes`` is
        (qs, d, m) of a ``QuantizedTensor``, or (bf16 weight [N, K], None, None) for FD_BF16.
        ``int8_activations``: x rounded to int8 per 32-block against the weights' integers
        (fd_linear_q8; approximate; integer formats, ``has_q8`` builds)."""
        m_rows, k = x.shape
        if out is None:
            out = torch.empty(m_rows, n, dtype=torch.float32)
        qs, d, mins = planes
        rc = (self.lib.fd_linear_q8 if int8_activations else self.lib.fd_linear)(
            FORMAT_IDS[fmt],
            x.data_ptr(),
            x.stride(0),
            m_rows,
            k,
            qs.data_ptr(),
            None if d is None else d.data_ptr(),
            None if mins is None else mins.data_ptr(),
            None if bias is None else bias.data_ptr(),
            out.data_ptr(),
            out.stride(0),
            n,
            torch.get_num_threads(),
        )
        if rc != 0:
            name = "fd_linear_q8" if int8_activations else "fd_linear"
            raise RuntimeError(f"{name}({fmt}, M={m_rows}, N={n}, K={k}) failed with code {rc}")
        return out

    def sample(self, x: torch.Tensor, temps: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Row r's token drawn from softmax(x[r] / temps[r]) by inverting its cumulative distribution at
        u[r] in [0, 1). ``x`` (fp32 [R, V], unit column stride) is overwritten."""
        rows, vocab = x.shape
        if x.dtype != torch.float32 or x.stride(1) != 1:
            raise ValueError("sample needs fp32 logits with unit column stride")
        temps = temps.to(torch.float32).contiguous()
        u = u.to(torch.float32).contiguous()
        out = torch.empty(rows, dtype=torch.long)
        rc = self.lib.fd_sample(
            _f32(x), x.stride(0), rows, vocab, _f32(temps), _f32(u), ctypes.c_void_p(out.data_ptr())
        )
        if rc != 0:
            raise ValueError("cannot sample: a row has no finite logit, or a temperature is not positive")
        return out

    def linear_i8(
        self,
        fmt: str,
        x: torch.Tensor,
        packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
        n: int,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """y = x W^T (+ bias) with x quantized to int8 per 32-block (approximate: the rounding of
        ``int8_activations``), W repacked 16 rows at a time by ``repack_i8``."""
        m_rows, k = x.shape
        out = torch.empty(m_rows, n, dtype=torch.float32)
        qp, dp, mp = packed
        rc = self._linear_i8(
            FORMAT_IDS[i8_format(fmt, packed)],
            x.data_ptr(),
            x.stride(0),
            m_rows,
            k,
            qp.data_ptr(),
            dp.data_ptr(),
            None if mp is None else mp.data_ptr(),
            None if bias is None else bias.data_ptr(),
            out.data_ptr(),
            out.stride(0),
            n,
            torch.get_num_threads(),
        )
        if rc != 0:
            raise RuntimeError(f"fd_linear_i8({fmt}, M={m_rows}, N={n}, K={k}) failed with code {rc}")
        return out

    def dequant_into(self, fmt: str, planes: Planes, n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:
        """Dequantize rows [n0, n1) of a matrix in ``fmt`` into the fp32 or bf16 ``out`` [n1 - n0, K]
        (a reusable scratch buffer)."""
        qs, d, m = planes
        k = qs.shape[1] * 32
        if not (0 <= n0 <= n1 <= qs.shape[0]) or out.shape != (n1 - n0, k) or not out.is_contiguous():
            raise ValueError("dequant_into: bad row range or output buffer")
        if out.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dequant_into: {out.dtype} output")
        rc = self._dequant(
            FORMAT_IDS[fmt],
            qs.data_ptr() + n0 * qs.stride(0),
            d.data_ptr() + n0 * d.stride(0) * d.element_size(),
            None if m is None else m.data_ptr() + n0 * m.stride(0) * m.element_size(),
            n1 - n0,
            k,
            None,
            n1 - n0,
            out.data_ptr(),
            int(out.dtype == torch.bfloat16),
            torch.get_num_threads(),
        )
        if rc != 0:
            raise RuntimeError(f"fd_dequant({fmt}) failed with code {rc}")
        return out

    def dequant(
        self, fmt: str, planes: Planes, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Dequantize a matrix in ``fmt`` (or its ``rows``) to fp32 or bf16; None for other dtypes."""
        if dtype not in (torch.float32, torch.bfloat16):
            return None
        qs, d, m = planes
        n, k = qs.shape[0], qs.shape[1] * 32
        idx = None if rows is None else rows.reshape(-1).long().contiguous()
        count = n if idx is None else idx.numel()
        out = torch.empty(count, k, dtype=dtype)
        rc = self._dequant(
            FORMAT_IDS[fmt],
            qs.data_ptr(),
            d.data_ptr(),
            None if m is None else m.data_ptr(),
            n,
            k,
            None if idx is None else idx.data_ptr(),
            count,
            out.data_ptr(),
            int(dtype == torch.bfloat16),
            torch.get_num_threads(),
        )
        if rc != 0:
            raise RuntimeError(f"fd_dequant({fmt}) failed with code {rc}")
        return out


def _nibble_vectors(values: torch.Tensor) -> torch.Tensor:
    """[groups, nb, 16 rows, 32] values 0..15 -> the 4 vectors of 16 rows x 4 bytes of one block:
    vector i's bytes hold quad i (elements 4i..4i+3) in their low nibbles and quad i + 4 in their high."""
    groups, nb = values.shape[:2]
    q = values.reshape(groups, nb, 16, 8, 4).permute(0, 1, 3, 2, 4)  # [g, b, quad, row, 4]
    return q[:, :, :4] | (q[:, :, 4:] << 4)


def _rows16(t: torch.Tensor) -> torch.Tensor:
    """[N, count, ...] -> [groups, count, 16, ...]: rows in groups of 16, the last zero-padded."""
    n, count = t.shape[:2]
    groups = -(-n // 16)
    if groups * 16 > n:
        t = torch.cat([t, t.new_zeros((groups * 16 - n, *t.shape[1:]))])
    return t.reshape(groups, 16, count, *t.shape[2:]).transpose(1, 2)


def _scales16(t: torch.Tensor, count: int) -> torch.Tensor:
    """Scales [N, count * s] -> [groups, count, s, 16]: a vector of 16 rows per scale."""
    return _rows16(t.reshape(t.shape[0], count, -1)).transpose(2, 3).contiguous()


def _unrows16(t: torch.Tensor, n: int) -> torch.Tensor:
    """_rows16's inverse: [groups, count, 16, ...] -> [n, count, ...]."""
    return t.transpose(1, 2).reshape(t.shape[0] * 16, t.shape[1], *t.shape[3:])[:n]


def _unscales16(t: torch.Tensor, n: int) -> torch.Tensor:
    """_scales16's inverse: [groups, count, s, 16] -> [n, count * s]."""
    return _unrows16(t.transpose(2, 3), n).reshape(n, -1).contiguous()


def repack_i8(fmt: str, planes: Planes, lean: bool = True) -> Planes:
    """A matrix in ``fmt`` in the int8-activation kernel's layout (flat_gemm.c, "rows interleaved"):
    groups of 16 rows (zero-padded), per block 4 vectors of 16 rows x 4 nibble pairs (Q4_0, Q4_1, Q4_K,
    Q2_K; Q5_K adds 64 bytes of fifth bits) or 8 vectors of 16 rows x 4 bytes (Q8_0, Q6_K); d and m as
    [groups, K/32, scales per block, 16], in the planes' own dtype. Values are moved, never changed.
    Q6_K and Q4_K whose fp32 scales factor exactly into the file's two levels (``_lean_scales``) pack
    lean, Q5_K holding a Q5_0 matrix as Q5_0: the kernel format is ``i8_format``'s (``lean=False``:
    never, the fp32 layout of the planes' scales, to compare against)."""
    qs, d_plane, m_plane = planes
    n, nb = qs.shape[0], qs.shape[1]
    groups = -(-n // 16)
    if lean and fmt == "Q6_K" and (packed := _lean_q6_k(qs, d_plane)) is not None:
        return packed
    if lean and fmt == "Q4_K" and (packed := _lean_q4_k(qs, d_plane, m_plane)) is not None:
        return packed
    if fmt in ("Q8_0", "Q6_K"):  # a byte per value
        q = _rows16(qs).reshape(groups, nb, 16, 8, 4).permute(0, 1, 3, 2, 4)  # [g, b, quad, row, 4]
    elif fmt == "Q5_K":  # values 0..31, a byte each in the planes: low nibbles as Q4, then fifth bits
        nibbles = _nibble_vectors(_rows16(qs & 0x0F))
        # [g, b, half, row, part (quads i / i + 4), i, 4] -> [g, b, i, half, part, 32 bits]
        fifth = (_rows16(qs >> 4) & 1).reshape(groups, nb, 2, 8, 2, 4, 4).permute(0, 1, 5, 2, 4, 3, 6)
        weights = 1 << torch.arange(8, dtype=torch.uint8)
        bits = (fifth.reshape(groups, nb, 64, 8) * weights).sum(-1, dtype=torch.uint8)  # bit k: byte k
        q = torch.cat([nibbles.reshape(groups, nb, 256), bits], dim=-1)
    else:
        q = _nibble_vectors(_rows16(torch.cat([qs & 0x0F, qs >> 4], dim=-1)))  # element order

    # Q5_0 in Q5_K's planes: the file's scales alone, 5.5 bits a weight, not 7
    if lean and fmt == "Q5_K" and _is_q5_0(d_plane, m_plane):
        return q.contiguous(), _scales16(d_plane.half(), nb), None
    return q.contiguous(), _scales16(d_plane, nb), None if m_plane is None else _scales16(m_plane, nb)


def _lean_q6_k(qs: torch.Tensor, d: torch.Tensor) -> Planes | None:
    """Q6_K's lean repack (flat_gemm.c FD_Q6_K_I8), or None where its values are not 6-bit (Q3_K's
    are; IQ4_XS's, repacked into these planes too, are not) or its scales do not factor: values
    q + 32 as Q4's nibbles of the low 4 bits and two vectors of high bits per block, int8 sub-scales
    per 16 and fp16 scales per 256."""
    signed = qs.view(torch.int8)
    if signed.numel() and not (signed.min() >= -32 and signed.max() < 32):
        return None
    factors = _lean_scales("Q6_K", d, qs.shape[1])
    if factors is None:
        return None
    sub, sup = factors
    u = (signed + 32).view(torch.uint8)  # [N, nb, 32], 0..63
    groups, nb = -(-qs.shape[0] // 16), qs.shape[1]
    low = _nibble_vectors(_rows16(u & 0x0F)).reshape(groups, nb, 256)
    # [g, b, row, part p (quads 0-3 / 4-7), vector t, 4] -> [g, b, p, row, 4, t]: t's 2 bits at 2t
    top = (_rows16(u >> 4).reshape(groups, nb, 16, 2, 4, 4).permute(0, 1, 3, 2, 5, 4)).reshape(-1, 4)
    high = (top << torch.tensor([0, 2, 4, 6], dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    q = torch.cat([low, high.reshape(groups, nb, 128)], dim=-1)
    return q.contiguous(), _scales16(sub, nb), _scales16(sup, nb // 8).reshape(groups, nb // 8, 16)


def _lean_q4_k(qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> Planes | None:
    """Q4_K's lean repack (flat_gemm.c FD_Q4_K_I8), or None where its scales do not factor: the
    nibbles as Q4_K's, uint8 sub-scales (sc, then mn) per 32 and fp16 scales (d, then -dmin) per 256."""
    factors, min_factors = (_lean_scales("Q4_K", t, qs.shape[1]) for t in (d, m))
    if factors is None or min_factors is None:
        return None
    nb = qs.shape[1]
    q = _nibble_vectors(_rows16(torch.cat([qs & 0x0F, qs >> 4], dim=-1)))
    sub = torch.stack([factors[0], min_factors[0]], dim=-1)  # [N, nb, 2]
    sup = torch.stack([factors[1], min_factors[1]], dim=-1)  # [N, nb / 8, 2]
    return q.contiguous(), _scales16(sub, nb), _scales16(sup, nb // 8)


def _lean_scales(fmt: str, v: torch.Tensor, nb: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """fp32 scales [N, nb * s] (s sub-scales per block of 32) as integer sub-scales (``LEAN_SUBSCALES``)
    times an fp16 per 256 elements, whose fp32 product gives every one back exactly, or None where
    some super-block has no such factors (then the fp32 layout stays). A plane made from the file's
    scales (layers/quant.py: fp16 d times the sub-scale, exact) always factors; the search tries
    sub-scales for the super-block's largest scale from the file's usual one (``LEAN_SUBSCALES``) down,
    then the rest of the range."""
    dtype, lo, hi, usual = LEAN_SUBSCALES[fmt]
    n, count = v.shape
    if nb % 8 or not v.numel() or v.dtype != torch.float32:
        return None
    per = count // (nb // 8)  # sub-scales per 256
    blocks = v.reshape(-1, per)
    big = blocks.gather(1, blocks.abs().argmax(1, keepdim=True))[:, 0]  # the largest magnitude
    zero = big == 0  # an all-zero super-block: +0 times 0 or -1 (a -0), or a signed zero times 0
    sup = (
        torch.zeros(blocks.shape[0], dtype=torch.float32) if lo < 0 else torch.where(zero, blocks[:, 0], 0.0)
    )
    done = zero.clone()
    candidates = sorted((s for s in range(lo, hi + 1) if s), key=lambda s: (abs(s) > usual, -abs(s), s))
    for s in candidates:
        if bool(done.all()):
            break
        todo = (~done).nonzero()[:, 0]
        h = big[todo] / s
        q = torch.round(blocks[todo] / h[:, None]) + 0.0  # an integer's zero is +0
        fits = (h.half().float() == h) & torch.isfinite(h) & (h != 0)
        # bitwise: a zero's sign is the fp16 factor's, so that the product is the plane's bit for bit
        fits &= ((q >= lo) & (q <= hi) & (_bits(q * h[:, None]) == _bits(blocks[todo]))).all(1)
        sup[todo[fits]] = h[fits]
        done[todo[fits]] = True
    if not bool(done.all()):
        return None
    safe = torch.where(zero, torch.ones_like(sup), sup)
    sub = torch.where(
        zero[:, None],
        torch.where(torch.signbit(blocks), -1.0, 0.0) if lo < 0 else 0.0,
        torch.round(blocks / safe[:, None]) + 0.0,
    )
    if not torch.equal(_bits(sub * sup[:, None]), _bits(blocks)):  # a zero super-block of +0s and -0s
        return None
    return sub.to(dtype).reshape(n, count), sup.half().reshape(n, count // per)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _is_q5_0(d: torch.Tensor, m: torch.Tensor) -> bool:
    """Whether Q5_K planes hold a Q5_0 matrix (layers/quant.py: m = -16 d, d an fp16): its scales
    then pack as fp16 with the min implied, values unchanged."""
    half = d.half()
    return bool(torch.equal(half.float(), d) and torch.equal(m, -16 * d) and torch.isfinite(half).all())


def i8_format(fmt: str, packed: Planes) -> str:
    """The kernel format that runs a ``repack_i8`` result of ``fmt``: "Q5_0" for the lean Q5_K,
    "Q6_K_I8" and "Q4_K_I8" for the lean K-quants (integer sub-scales)."""
    if fmt == "Q5_K" and packed[2] is None:
        return "Q5_0"
    if fmt in LEAN_SUBSCALES and packed[1] is not None and packed[1].dtype == LEAN_SUBSCALES[fmt][0]:
        return f"{fmt}_I8"
    return fmt


def i8_bytes_per_weight(fmt: str, packed: Planes) -> float:
    """The bytes a product reads per weight of a ``repack_i8`` result (a group's padding rows too)."""
    q = packed[0]
    weights = q.shape[0] * 16 * q.shape[1] * 32
    return sum(t.numel() * t.element_size() for t in packed if t is not None) / weights


def unpack_i8(fmt: str, packed: Planes, n: int) -> Planes:
    """The planes (qs, d, m) of an ``n``-row matrix that ``repack_i8`` turned into ``packed``: the exact
    inverse, padding rows dropped."""
    q, d_packed, m_packed = packed
    groups, nb = q.shape[:2]
    kernel = i8_format(fmt, packed)
    if kernel in ("Q6_K_I8", "Q4_K_I8"):
        return _unpack_lean(kernel, packed, n)

    def values(vectors: torch.Tensor) -> torch.Tensor:  # [g, b, quad, row, 4] -> [g, b, row, 32]
        return vectors.permute(0, 1, 3, 2, 4).reshape(groups, nb, 16, 32)

    if fmt in ("Q8_0", "Q6_K"):
        qs = _unrows16(values(q), n)
    else:
        nibbles = q[:, :, :256].reshape(groups, nb, 4, 16, 4) if fmt == "Q5_K" else q
        low = _nibbles_unpacked(nibbles, n)  # element order
        if fmt == "Q5_K":
            bits = (q[:, :, 256:, None] >> torch.arange(8, dtype=torch.uint8)) & 1  # [g, b, 64, 8]
            fifth = bits.reshape(groups, nb, 4, 2, 2, 8, 4).permute(0, 1, 3, 5, 4, 2, 6)
            qs = low | (_unrows16(fifth.reshape(groups, nb, 16, 32), n) << 4)
        else:
            qs = low[..., :16] | (low[..., 16:] << 4)

    if kernel == "Q5_0":
        d = _unscales16(d_packed, n).float()
        return qs.contiguous(), d, -16 * d
    return qs.contiguous(), _unscales16(d_packed, n), None if m_packed is None else _unscales16(m_packed, n)


def _nibbles_unpacked(vectors: torch.Tensor, n: int) -> torch.Tensor:
    """_nibble_vectors' inverse: [g, b, 4 vectors, 16 rows, 4] -> values [n, nb, 32] in element order."""
    groups, nb = vectors.shape[:2]
    quads = torch.cat([vectors & 0x0F, vectors >> 4], dim=2)  # [g, b, quad, row, 4]
    return _unrows16(quads.permute(0, 1, 3, 2, 4).reshape(groups, nb, 16, 32), n)


def _unpack_lean(kernel: str, packed: Planes, n: int) -> Planes:
    """unpack_i8 of a lean K-quant: the values as the planes hold them, and the fp32 scales as the
    product of the two factors (the same IEEE product the loader took, so the same bits)."""
    q, sub, sup = packed
    groups, nb = q.shape[:2]
    values = _nibbles_unpacked(q[:, :, :256].reshape(groups, nb, 4, 16, 4), n)
    per_super = _unscales16(sup.reshape(groups, nb // 8, -1, 16), n).float()  # [n, nb / 8 * s']
    subs = _unscales16(sub, n).float().reshape(n, nb // 8, 8, 2)
    if kernel == "Q6_K_I8":
        # [g, b, p, row, 4, t] -> [g, b, row, p, t, 4]: vector t, part p holds quad 4p + t
        bits = (
            q[:, :, 256:].reshape(groups, nb, 2, 16, 4, 1) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
        ) & 3
        top = _unrows16(bits.permute(0, 1, 3, 2, 5, 4).reshape(groups, nb, 16, 32), n)
        qs = ((values | (top << 4)).view(torch.int8) - 32).view(torch.uint8)
        d = (per_super[:, :, None, None] * subs).reshape(n, -1)
        return qs.contiguous(), d, None
    qs = values[..., :16] | (values[..., 16:] << 4)
    per_super = per_super.reshape(n, nb // 8, 1, 2)
    d, m = ((per_super[..., k] * subs[..., k]).reshape(n, -1) for k in (0, 1))
    return qs.contiguous(), d, m


def supported_builds(flags: set[str] | None = None) -> list[str]:
    """The builds this CPU can run, best first (the portable build always)."""
    flags = cpu_flags() if flags is None else flags
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
    return [
        name for name, (needs, _) in ISA_BUILDS.items() if name == "generic" or (x86 and set(needs) <= flags)
    ]


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc and shutil.which(cc):
        return cc
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    return None


def _compiler_id(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return cc


def kernel_dir() -> Path:
    explicit = os.environ.get("FLASHDECODE_KERNEL_DIR")
    return Path(explicit).expanduser() if explicit else cache_dir() / "kernels"


def _build(isa: str, cc: str) -> Path:
    source = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    _, isa_flags = ISA_BUILDS[isa]
    for openmp in (("-fopenmp",), ()):
        flags = BASE_FLAGS + isa_flags + openmp
        key = hashlib.sha256(
            source + " ".join(flags).encode() + _compiler_id(cc).encode() + str(ABI_VERSION).encode()
        ).hexdigest()[:16]
        directory = kernel_dir()
        path = directory / f"flat_gemm-{isa}-{key}.so"
        if path.exists():
            return path
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(fd)
        try:
            proc = subprocess.run(
                [cc, *flags, *map(str, SOURCES), "-o", tmp, "-lm"],
                capture_output=True,
                text=True,
                timeout=300,
            )
            if proc.returncode == 0:
                os.replace(tmp, path)
                return path
            error = proc.stderr.strip().splitlines()[-1:] or ["?"]
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if "fopenmp" not in error[0]:
            break  # not an OpenMP problem: a build without it fails the same way
    raise RuntimeError(f"{cc} failed: {error[0]}")


def _self_test(kernels: NativeKernels) -> None:
    """A small product in every format against a float64 reference, before any real use."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 96, generator=gen)
    w = torch.randn(13, 96, generator=gen)

    def k_quant(fmt: str) -> Planes:  # random planes: the kernels never look at how they arose
        layout = NATIVE[fmt]
        lo, hi = {"Q5_K": (0, 32), "Q6_K": (-32, 32)}.get(fmt, (0, 256))  # 256: any nibble pair
        qs = torch.randint(lo, hi, (13, 3, layout.qs_bytes), generator=gen).to(torch.int8)
        # fp16-representable scales, as real ones are (an fp16 times a small integer): d * q is exact
        d = torch.randn(13, 3 * layout.scales_per_block, generator=gen).half().float()
        m = torch.randn(13, d.shape[1], generator=gen) if layout.has_min else None
        return qs.view(torch.uint8), d, m

    for fmt, layout in NATIVE.items():
        planes = k_quant(fmt) if layout.repacked else reference.quantize(w, fmt)
        ref = reference.dequantize(fmt, *planes)
        if not torch.equal(kernels.dequant(fmt, planes), ref):
            raise RuntimeError(f"self-test: {fmt} dequantization differs")
        for m in (1, 6):
            y = kernels.linear(fmt, x[:m], planes, 13)
            if not torch.allclose(y.double(), x[:m].double() @ ref.double().T, rtol=1e-4, atol=1e-4):
                raise RuntimeError(f"self-test: {fmt} product differs at M={m}")
    if kernels.has_q8:
        for fmt, layout in NATIVE.items():
            planes = k_quant(fmt) if layout.repacked else reference.quantize(w, fmt)
            ref = reference.linear_q8(x, fmt, planes)
            y = kernels.linear(fmt, x, planes, 13, int8_activations=True)
            if not torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-4 * float(ref.abs().max())):
                raise RuntimeError(f"self-test: {fmt} int8-activation product differs")
    if kernels.has_i8:
        cases = [(f, k_quant(f) if NATIVE[f].repacked else reference.quantize(w, f)) for f in I8_FORMATS]
        qs, d, _ = k_quant("Q5_K")
        cases.append(("Q5_K", (qs, d, -16 * d)))  # a Q5_0 matrix's planes: repack_i8 packs them lean
        cases += [(fmt, _two_level_planes(fmt, gen)) for fmt in LEAN_SUBSCALES]  # the lean K-quants
        for fmt, planes in cases:
            k = planes[0].shape[1] * 32  # the lean K-quants' rows are super-blocks of 256
            xk = x if k == x.shape[1] else torch.randn(6, k, generator=gen)
            ref = reference.linear_q8(xk, fmt, planes)
            packed = repack_i8(fmt, planes)
            y = kernels.linear_i8(fmt, xk, packed, 13)
            if not torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-4 * float(ref.abs().max())):
                raise RuntimeError(f"self-test: {i8_format(fmt, packed)} int8-activation product differs")
        if kernels.has_amx:
            _self_test_amx(kernels, cases, gen)
    wb = w[:, :77].bfloat16()
    y = kernels.linear("BF16", x[:, :77].contiguous(), (wb, None, None), 13)
    if not torch.allclose(y.double(), x[:, :77].double() @ wb.double().T, rtol=1e-4, atol=1e-4):
        raise RuntimeError("self-test: bf16 product differs")


def _two_level_planes(fmt: str, gen: torch.Generator, n: int = 13, k: int = 256) -> Planes:
    """Random Q6_K or Q4_K planes whose scales are the file's two levels multiplied out (an fp16 per
    256 times an integer sub-scale, layers/quant.py), as repack_i8 packs lean."""
    layout = NATIVE[fmt]
    nb = k // 32
    dtype, lo, hi, _ = LEAN_SUBSCALES[fmt]

    def scales() -> torch.Tensor:
        sup = torch.randn(n, nb // 8, 1, generator=gen).half().float()
        sub = torch.randint(lo, hi + 1, (n, nb // 8, 8 * layout.scales_per_block), generator=gen)
        return (sup * sub.to(dtype).float()).reshape(n, -1)

    values = (-32, 32) if fmt == "Q6_K" else (0, 256)  # 6-bit signed values; any nibble pair
    qs = torch.randint(*values, (n, nb, layout.qs_bytes), generator=gen).to(torch.int8).view(torch.uint8)
    return qs, scales(), scales() if layout.has_min else None


def _self_test_amx(kernels: NativeKernels, cases: list[tuple[str, Planes]], gen: torch.Generator) -> None:
    """The AMX products (40 rows: two tiles and a partial one) against the reference and, bit for bit,
    against the VNNI path."""
    was = kernels.set_amx()
    try:
        for fmt, planes in cases:
            x = torch.randn(40, planes[0].shape[1] * 32, generator=gen)
            packed = repack_i8(fmt, planes)
            kernels.set_amx(True)
            y = kernels.linear_i8(fmt, x, packed, 13)
            kernels.set_amx(False)
            if not torch.equal(y, kernels.linear_i8(fmt, x, packed, 13)):
                raise RuntimeError(f"self-test: {fmt} AMX product differs from VNNI")
            ref = reference.linear_q8(x, fmt, planes)
            if not torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-4 * float(ref.abs().max())):
                raise RuntimeError(f"self-test: {fmt} AMX product differs")
    finally:
        kernels.set_amx(was)


def load(isa: str | None = None) -> NativeKernels | None:
    """The best native build this machine runs (or the named one), or None. Cached per process."""
    key = isa or "best"
    with _lock:
        if key in _state:
            return _state[key]
        result = None
        if os.environ.get("FLASHDECODE_NATIVE", "1") != "0":
            result = _load(isa)
        _state[key] = result
        return result


def _load(isa: str | None) -> NativeKernels | None:
    cc = _compiler()
    builds = supported_builds()
    if isa is not None:
        if isa not in builds:
            return None
        builds = [isa]
    errors = []
    if cc is None:
        errors.append("no C compiler (set CC or install gcc)")
    else:
        for name in builds:
            try:
                path = _build(name, cc)
                lib = ctypes.CDLL(str(path))
                if lib.fd_abi_version() != ABI_VERSION:
                    raise RuntimeError("stale library")
                kernels = NativeKernels(lib, lib_isa(lib), path)
                _self_test(kernels)
                return kernels
            except Exception as exc:  # a failed build must never take the engine down
                errors.append(f"{name}: {exc}")
    message = f"native CPU kernels unavailable ({'; '.join(errors)})"
    if os.environ.get("FLASHDECODE_REQUIRE_NATIVE") == "1":
        raise RuntimeError(f"flashdecode: {message}, and FLASHDECODE_REQUIRE_NATIVE=1")
    warnings.warn(
        f"flashdecode: {message}; quantized weights run on torch kernels",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def lib_isa(lib: ctypes.CDLL) -> str:
    lib.fd_isa.restype = ctypes.c_char_p
    return lib.fd_isa().decode()
