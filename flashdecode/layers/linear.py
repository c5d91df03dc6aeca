"""y = x W^T for every projection of the decoder: the candidate kernels and per-M dispatch.

A ``Linear`` owns its weight in its stored format (fp32, bf16, or GGUF blocks as a
``QuantizedTensor``) and can run it with every candidate kernel of the registry (``CANDIDATES``)
whose ``applies`` accepts it; each candidate prepares the exact weight format it consumes once, on
first use. A new kernel is one ``@candidate`` entry below:

    native       flashdecode's flat GEMM (kernels/cpu/flat_gemm.c): reads every weight byte once,
                 dequantizing in registers; for quantized and bf16 weights (paper section 4)
    dequant_f32  dequantize a cache-sized slab at a time, then torch's fp32 GEMM: for large M
    torch_f32    torch F.linear on an fp32 weight
    torch_bf16   torch F.linear on a bf16 weight (exact for bf16 checkpoints)
    torch_int4   torch's int4 weight-only kernel on an exact repack of Q4_0/Q4_1 (N % 16 == 0)
    dequant_bf16 dequantize to bf16, then torch's bf16 GEMM (approximate: rounds the weights)
    native_q8    int8 activations (per 32-block scales, as llama.cpp) times the integer weights of any
                 native format, read in place (AVX2 vpmaddubsw; approximate: rounds the activations)
    native_i8    the same rounding on weights repacked 16 rows at a time (every native integer
                 format): a lane is a weight row, so each activation byte serves 16 rows (AVX2
                 vpmaddubsw on 8-row halves; AVX512-VNNI vpdpbusd for Q4_0, Q4_1, Q8_0)
    torch_bf16_cast  torch F.linear on an fp32 weight rounded to bf16 (approximate)
    triton       the Triton flat GEMM (kernels/triton/flat_gemm.py), fused dequantization: the GPU
                 version of ``native``, for float and quantized weights

Each ``Linear`` carries the kernel ``backend`` it was built for (``layers/device.py``: "native" on the
CPU, "triton" for ``device="cuda"``), handed down by whoever builds it (the decoder). On "native" the
C and torch candidates apply; on "triton" only ``triton`` and the torch ``F.linear`` ones, which run on
any device.

"exact" candidates compute with exactly the stored weights and fp32 accumulation (they differ only
in summation order); approximate ones round weights or activations and run only where a tuned
table allows them (``flashdecode tune --allow-approx``).

Which candidate runs at which M is the dataflow's business (layers/dataflow.py, paper section 5):
``Linear.set_plan`` turns a plan into a list indexed by M, so picking the kernel for a step is one
list lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import cpu, reference
from ..kernels import triton as triton_kernels
from ..kernels.formats import I8_FORMATS, NATIVE_FORMATS, canonical
from ..utils.memory import advise_huge_pages, huge_page_copy
from .device import BACKENDS
from .quant import QuantizedTensor

Kernel = Callable[[torch.Tensor], torch.Tensor]
Plan = list[tuple[int, str]]  # [(first M, candidate), ...], ascending; the last range is unbounded
MAX_PLAN_M = 512  # plans are expanded for M = 1..MAX_PLAN_M; larger M uses the last range

SCRATCH_BYTES = 4 << 20  # dequant_* candidates dequantize slabs of about this size (stays in cache)
_scratch_buffers: dict[torch.dtype, torch.Tensor] = {}


def _scratch(rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """A [rows, k] view of one process-wide scratch buffer per dtype (grown on demand)."""
    buf = _scratch_buffers.get(dtype)
    if buf is None or buf.numel() < rows * k:
        buf = _scratch_buffers[dtype] = torch.empty(rows * k, dtype=dtype)
    return buf[: rows * k].view(rows, k)


@dataclass(frozen=True)
class Candidate:
    name: str
    exact: bool  # False: rounds weights or activations beyond the stored format
    summary: str
    applies: Callable[[Linear], bool]  # can it run this Linear's weight on this machine?
    make: Callable[[Linear], Kernel]  # the kernel, with its weight format prepared


CANDIDATES: dict[str, Candidate] = {}


def candidate(name: str, exact: bool, summary: str, applies: Callable[[Linear], bool]):
    """Register the decorated ``make(linear) -> kernel`` as candidate ``name``."""

    def register(make: Callable[[Linear], Kernel]) -> Callable[[Linear], Kernel]:
        CANDIDATES[name] = Candidate(name, exact, summary, applies, make)
        return make

    return register


def weight_format(weight: torch.Tensor | QuantizedTensor) -> str:
    if isinstance(weight, QuantizedTensor):
        return weight.format
    return canonical(str(weight.dtype))


class Linear:
    plans_set = 0  # counts set_plan calls of every Linear: whoever caches per-plan state compares it

    def __init__(
        self,
        weight: torch.Tensor | QuantizedTensor,
        bias: torch.Tensor | None = None,
        backend: str = "native",
    ):
        """``backend``: the kernels that may run this weight ("native" or "triton", ``Device.backend``);
        the weight and bias already live on that backend's device."""
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
        self._weight: torch.Tensor | QuantizedTensor | None = (
            weight if isinstance(weight, QuantizedTensor) else weight.contiguous()
        )
        self.bias = None if bias is None else bias.contiguous()
        self.format = weight_format(weight)
        self.shape = tuple(weight.shape)
        self.quantized = isinstance(weight, QuantizedTensor)
        self.device = weight.device
        self.backend = backend
        self._impls: dict[str, Kernel] = {}
        self._by_m: list[Kernel] = []
        self._last: Kernel | None = None
        self._i8: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self.plan: Plan = []

    @property
    def weight(self) -> torch.Tensor | QuantizedTensor:
        """The weight in its stored format. Where the plan runs only ``native_i8``, ``release`` drops it
        (the rows-interleaved repack holds the same values, so the model is held once); asked for
        again, it is rebuilt exactly from the repack."""
        if self._weight is None:
            assert self._i8 is not None  # release drops the weight only while the repack is held
            self._weight = QuantizedTensor(self.format, *cpu.unpack_i8(self.format, self._i8, self.shape[0]))
        return self._weight

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``W[ids]`` as ``dtype`` (a tied head's embedding lookup, so that the matrix is held
        once): from the stored weight, or, where ``release`` dropped it, read from the repack in place
        (``_i8_rows``), without rebuilding (and holding) the whole weight."""
        w = self._weight
        if isinstance(w, QuantizedTensor):
            return w.rows(ids, dtype)
        if w is not None:
            return F.embedding(ids, w).to(dtype)
        flat = ids.reshape(-1).long()
        rows = reference.dequantize(self.format, *self._i8_rows(flat))
        return rows.to(dtype).reshape(*ids.shape, self.in_features)

    def _i8_rows(self, flat: torch.Tensor) -> reference.Planes:
        """The planes of rows ``flat`` from the repack (kernels/cpu/build.py repack_i8): row i is row
        i % 16 of group i // 16. A byte per value: its 8 vectors of 4 bytes are the row's values in
        order; the nibble layouts (and the lean Q6_K's) are unpacked a group at a time."""
        q, d, m = self._i8
        group, row = flat // 16, flat % 16
        if cpu.i8_format(self.format, self._i8) in ("Q8_0", "Q6_K"):
            qs = q[group, :, :, row, :].reshape(len(flat), q.shape[1], -1)
            return qs, d[group, :, :, row].reshape(len(flat), -1), None if m is None else m[group, :, row]
        packed = (q[group], d[group], None if m is None else m[group])
        qs, ds, ms = cpu.unpack_i8(self.format, packed, 16 * len(flat))
        pick = torch.arange(len(flat)) * 16 + row
        return qs[pick], ds[pick], None if ms is None else ms[pick]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.format == "BF16" else torch.float32

    def shape_key(self) -> str:
        """What a tuned table is keyed by: storage format and [N, K]."""
        return f"{self.format}:{self.out_features}x{self.in_features}"

    def bias_as(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype).contiguous()

    # --- candidates ------------------------------------------------------------------------------

    def candidates(self, allow_approx: bool = False) -> list[str]:
        """The candidates that can run this weight on this machine, in registry order."""
        return [c.name for c in CANDIDATES.values() if (c.exact or allow_approx) and c.applies(self)]

    def impl(self, name: str) -> Kernel:
        """The kernel of candidate ``name``, preparing its weight format once."""
        fn = self._impls.get(name)
        if fn is None:
            if name not in CANDIDATES or not CANDIDATES[name].applies(self):
                raise ValueError(f"candidate {name!r} cannot run a {self.shape_key()} weight here")
            fn = self._impls[name] = CANDIDATES[name].make(self)
        return fn

    def release(self, keep: Iterable[str] = ()) -> None:
        """Drop prepared formats (and their memory) of candidates not in ``keep``; where ``keep`` is
        ``native_i8`` alone, the stored weight too (``weight`` rebuilds it on demand)."""
        keep = set(keep)
        self._impls = {k: v for k, v in self._impls.items() if k in keep}
        if "torch_int4" not in keep:
            self._int4 = None
        if "native_i8" not in keep:
            self.weight  # noqa: B018  (rebuilt from the repack, if dropped, before the repack goes)
            self._i8 = None
        elif keep == {"native_i8"} and self._i8 is not None:
            self._weight = None

    def i8_repack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The weight repacked 16 rows at a time for ``native_i8`` (kernels/cpu/build.py repack_i8),
        built on first use and held until ``release`` drops it (a second copy of the weight)."""
        if self._i8 is None:
            self._i8 = _repack_i8_by_rows(self.format, self.weight.planes(), self.shape[0])
        return self._i8

    def i8_nbytes(self) -> int | None:
        """Bytes of the int8-activation repack, what ``native_i8`` reads a step (the lean K-quants'
        about the file's, fewer than the stored planes'), or None where it is not built."""
        return (
            None if self._i8 is None else sum(t.numel() * t.element_size() for t in self._i8 if t is not None)
        )

    def int4_repack(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Q4_0/Q4_1 as torch's int4 weight-only format, w = (q - 8) * scale + zero per 32-group, or
        None where that is not exact (the zero m + 8d not representable in fp32) or unsupported.
        Built on first use and held until ``release`` drops it (a second copy of the weight)."""
        if getattr(self, "_int4", None) is None and getattr(self, "_int4_ok", True):
            self._int4 = _int4_repack(self.weight)
            self._int4_ok = self._int4 is not None
        return self._int4

    def has_int4(self) -> bool:
        if not hasattr(self, "_int4_ok"):
            self.int4_repack()
        return self._int4_ok

    # --- dispatch --------------------------------------------------------------------------------

    def set_plan(self, plan: Plan) -> None:
        """Follow ``plan`` from now on: M in [plan[i][0], plan[i + 1][0]) runs candidate plan[i][1]."""
        plan = sorted((max(1, int(m)), name) for m, name in plan)
        if not plan:
            raise ValueError("empty plan")
        plan[0] = (1, plan[0][1])
        fns = [self.impl(name) for _, name in plan]
        by_m: list[Kernel] = [fns[0]]  # index 0: M = 0 (empty input)
        for i, (start, _) in enumerate(plan):
            end = plan[i + 1][0] if i + 1 < len(plan) else MAX_PLAN_M + 1
            by_m.extend([fns[i]] * max(0, min(end, MAX_PLAN_M + 1) - max(start, len(by_m))))
        self._by_m, self._last, self.plan = by_m, fns[-1], plan
        self.release(keep={name for _, name in plan})
        Linear.plans_set += 1

    def candidate_at(self, m: int) -> str:
        """The candidate the plan runs at M = ``m``."""
        return next(name for start, name in reversed(self.plan) if start <= m)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self._by_m:
            raise RuntimeError("Linear has no plan: layers/dataflow.py's configure() gives every Linear one")
        if x.shape[-1] != self.shape[1]:  # the C kernels take K from x and would read past the weight
            raise ValueError(f"input of {x.shape[-1]} features into a {self.shape_key()} projection")
        m = x.shape[0] if x.dim() == 2 else x.numel() // x.shape[-1]
        fn = self._by_m[m] if m < len(self._by_m) else self._last
        if x.dim() != 2:
            return fn(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)
        return fn(x)


class SplitLinear:
    """Projections fused along N whose weights cannot share one format: each part runs its own
    kernel and the outputs are concatenated."""

    def __init__(self, parts: Sequence[Linear]):
        self.parts = list(parts)

    @property
    def out_features(self) -> int:
        return sum(p.out_features for p in self.parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


REPACK_ROWS = 2048  # rows repacked at a time: a large matrix's repack temporaries stay this size


def _repack_i8_by_rows(fmt: str, planes: reference.Planes, n: int) -> reference.Planes:
    """``cpu.repack_i8`` of an ``n``-row matrix, ``REPACK_ROWS`` rows (whole 16-row groups) at a time
    into one buffer, its values on memory advised as huge pages (a decode step streams them
    through): the repack's temporaries never hold a whole matrix (a vocabulary-sized head's several
    times over). A group's layout depends on its own rows alone, so the pieces are the whole's
    groups in order. Q5_K packs lean or not by the whole matrix's scales: it is repacked at once."""
    if fmt == "Q5_K" or n <= REPACK_ROWS:
        q, d, m = cpu.repack_i8(fmt, planes)
        return huge_page_copy(q), d, m
    groups = -(-n // 16)
    out: list[torch.Tensor | None] = []
    for first in range(0, n, REPACK_ROWS):
        part = tuple(None if p is None else p[first : first + REPACK_ROWS] for p in planes)
        packed = cpu.repack_i8(fmt, part)
        if not out:
            out = [None if t is None else t.new_empty((groups, *t.shape[1:])) for t in packed]
            advise_huge_pages(out[0])
        for whole, t in zip(out, packed):
            if whole is not None:
                whole[first // 16 : first // 16 + t.shape[0]] = t
    return out[0], out[1], out[2]


def fused_linear(
    weights: Sequence[torch.Tensor | QuantizedTensor],
    biases: Sequence[torch.Tensor] | None = None,
    backend: str = "native",
) -> Linear | SplitLinear:
    """One Linear over weights concatenated along N (q/k/v, gate/up) when they share a format."""
    bias = None if biases is None else torch.cat(list(biases))
    if all(isinstance(w, QuantizedTensor) for w in weights):
        if len({w.format for w in weights}) == 1:
            fused = QuantizedTensor.cat(weights)
            first = 0
            for w in weights:  # the parts' blocks live on in the fused matrix, not beside it
                w.share_rows_of(fused, first)
                first += w.shape[0]
            return Linear(fused, bias, backend)
    elif not any(isinstance(w, QuantizedTensor) for w in weights):
        return Linear(torch.cat(list(weights)), bias, backend)
    splits = [w.shape[0] for w in weights]
    parts_bias = [None] * len(weights) if bias is None else list(bias.split(splits))
    return SplitLinear([Linear(w, b, backend) for w, b in zip(weights, parts_bias)])


def iter_linears(modules: Iterable[Linear | SplitLinear]) -> Iterable[Linear]:
    for mod in modules:
        if isinstance(mod, SplitLinear):
            yield from mod.parts
        else:
            yield mod


# --- the registry ---------------------------------------------------------------------------------


def _fp32_input(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 and x.stride(-1) == 1 else x.float().contiguous()


def _on_host(linear: Linear) -> bool:
    """The C and CPU-only torch kernels: the native backend, with the weight in host memory."""
    return linear.backend == "native" and linear.device.type == "cpu"


def _has_native(linear: Linear) -> bool:
    return _on_host(linear) and (linear.quantized or linear.format == "BF16") and cpu.load() is not None


def _flat_gemm(int8_activations: bool) -> Callable[[Linear], Kernel]:
    def make(linear: Linear) -> Kernel:
        lib, fmt, n, bias = cpu.load(), linear.format, linear.out_features, linear.bias_as(torch.float32)
        w = linear.weight
        planes = w.planes() if isinstance(w, QuantizedTensor) else (w, None, None)

        def native(x: torch.Tensor) -> torch.Tensor:
            y = lib.linear(fmt, _fp32_input(x), planes, n, bias, int8_activations=int8_activations)
            return y if x.dtype == torch.float32 else y.to(x.dtype)

        return native

    return make


candidate("native", True, "flat GEMM, fused dequantization (kernels/cpu/flat_gemm.c)", _has_native)(
    _flat_gemm(False)
)


def _dequant(dtype: torch.dtype) -> Callable[[Linear], Kernel]:
    def make(linear: Linear) -> Kernel:
        w, bias = linear.weight, linear.bias_as(dtype)
        lib = cpu.load()
        if lib is None:  # torch dequantization of the whole matrix per call: slow, but runs

            def dequant_torch(x: torch.Tensor) -> torch.Tensor:
                return F.linear(x.to(dtype), w.dequantize(dtype), bias).to(x.dtype)

            return dequant_torch
        n, k = w.shape
        rows = max(64, min(n, SCRATCH_BYTES // (4 * k)))
        chunks = [(n0, min(n, n0 + rows)) for n0 in range(0, n, rows)]
        fmt, planes = w.format, w.planes()

        def dequant(x: torch.Tensor) -> torch.Tensor:
            # dequantize a cache-sized slab of rows at a time into a reused scratch buffer and
            # multiply it while it is hot: no full-size float copy of the weight ever exists
            xd = x.to(dtype)
            if len(chunks) == 1:
                y = F.linear(xd, lib.dequant_into(fmt, planes, 0, n, _scratch(n, k, dtype)), bias)
            else:
                y = torch.empty(x.shape[0], n, dtype=dtype)
                for n0, n1 in chunks:
                    slab = lib.dequant_into(fmt, planes, n0, n1, _scratch(n1 - n0, k, dtype))
                    y[:, n0:n1] = F.linear(xd, slab, None if bias is None else bias[n0:n1])
            return y.to(x.dtype)

        return dequant

    return make


def _quantized(linear: Linear) -> bool:
    return linear.quantized and _on_host(linear)


candidate("dequant_f32", True, "dequantize to fp32, then torch GEMM", _quantized)(_dequant(torch.float32))


def _torch(dtype: torch.dtype) -> Callable[[Linear], Kernel]:
    def make(linear: Linear) -> Kernel:
        w = linear.weight
        wt, bias = (w if w.dtype == dtype else w.to(dtype)), linear.bias_as(dtype)

        def torch_linear(x: torch.Tensor) -> torch.Tensor:
            if x.dtype == dtype:
                return F.linear(x, wt, bias)
            return F.linear(x.to(dtype), wt, bias).to(x.dtype)

        return torch_linear

    return make


def _format_is(*formats: str) -> Callable[[Linear], bool]:
    return lambda linear: linear.format in formats


candidate("torch_f32", True, "torch F.linear, fp32 weight", _format_is("F32", "F16"))(_torch(torch.float32))
candidate("torch_bf16", True, "torch F.linear, bf16 weight", _format_is("BF16"))(_torch(torch.bfloat16))


def _has_triton(linear: Linear) -> bool:
    floats = ("F32", "F16", "BF16")
    return (
        linear.backend == "triton"
        and (linear.quantized or linear.format in floats)
        and triton_kernels.available()
    )


@candidate(
    "triton", True, "Triton flat GEMM, fused dequantization (kernels/triton/flat_gemm.py)", _has_triton
)
def _triton(linear: Linear) -> Kernel:
    from ..kernels.triton.flat_gemm import flat_gemm  # imports triton: only where it runs

    w, bias = linear.weight, linear.bias_as(torch.float32)

    def triton_linear(x: torch.Tensor) -> torch.Tensor:
        return flat_gemm(x, w, bias)

    return triton_linear


def _int4_repack(w: torch.Tensor | QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    op = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    if not isinstance(w, QuantizedTensor) or w.format not in ("Q4_0", "Q4_1") or op is None:
        return None
    n, k = w.shape
    d = w.d.float()
    if w.format == "Q4_1":
        exact = w.m.double() + 8 * d.double()
        zero = exact.float()
        if not bool((zero.double() == exact).all()):
            return None
    else:
        zero = torch.zeros_like(d)
    if n % 16:
        return None
    q = torch.cat([w.qs & 0x0F, w.qs >> 4], dim=-1).reshape(n, k).to(torch.int32)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    except RuntimeError:
        return None
    return packed, torch.stack([d.t(), zero.t()], dim=-1).contiguous()


@candidate(
    "torch_int4",
    True,
    "torch _weight_int4pack_mm_for_cpu, exact Q4 repack",
    lambda linear: _on_host(linear) and linear.has_int4(),
)
def _torch_int4(linear: Linear) -> Kernel:
    (packed, scales_zeros), bias = linear.int4_repack(), linear.bias_as(torch.float32)

    def int4(x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.float().contiguous(), packed, 32, scales_zeros)
        return (y if bias is None else y + bias).to(x.dtype)

    return int4


candidate("dequant_bf16", False, "dequantize to bf16, then torch bf16 GEMM", _quantized)(
    _dequant(torch.bfloat16)
)


def _has_q8(linear: Linear) -> bool:
    lib = cpu.load()
    return _quantized(linear) and linear.format in NATIVE_FORMATS and lib is not None and lib.has_q8


candidate("native_q8", False, "int8 activations per 32-block x native integer planes (AVX2)", _has_q8)(
    _flat_gemm(True)
)


def _has_i8(linear: Linear) -> bool:
    lib = cpu.load()
    return _on_host(linear) and linear.format in I8_FORMATS and lib is not None and lib.has_i8


@candidate("native_i8", False, "int8 activations per 32-block x weights repacked 16 rows at a time", _has_i8)
def _native_i8(linear: Linear) -> Kernel:
    lib, fmt, n, bias = cpu.load(), linear.format, linear.out_features, linear.bias_as(torch.float32)
    packed = linear.i8_repack()

    def native_i8(x: torch.Tensor) -> torch.Tensor:
        y = lib.linear_i8(fmt, _fp32_input(x), packed, n, bias)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    return native_i8


candidate("torch_bf16_cast", False, "torch F.linear, fp32 weight rounded to bf16", _format_is("F32", "F16"))(
    _torch(torch.bfloat16)
)
