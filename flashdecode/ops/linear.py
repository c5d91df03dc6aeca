"""y = x W^T for every projection of the decoder, with per-shape, per-M kernel dispatch.

A ``Linear`` owns its weight in its stored format (fp32, bf16, or GGUF Q4_0/Q4_1/Q8_0 blocks as a
``QuantizedTensor``) and can run it with several candidate kernels (``CANDIDATES``), each preparing
the exact weight format it consumes once, on first use:

    native       flashdecode's flat GEMM (csrc/flat_gemm.c): reads every weight byte once, dequantizing
                 in registers; for quantized and bf16 weights (paper section 4)
    dequant_f32  dequantize into a scratch buffer, then torch's fp32 GEMM: for large M
    torch_f32    torch F.linear on an fp32 weight
    torch_bf16   torch F.linear on a bf16 weight (exact for bf16 checkpoints, approximate otherwise)
    torch_int4   torch's int4 weight-only kernel on an exact repack of Q4_0/Q4_1 (N % 16 == 0)
    dequant_bf16 dequantize to bf16, then torch's bf16 GEMM (approximate: rounds the weights)
    native_i8    int8 activations (per 32-block scales, as llama.cpp) times the integer weights with
                 AVX512-VNNI dot products (approximate: rounds the activations)

"exact" candidates compute with exactly the stored weights and fp32 accumulation (they differ only
in summation order); "approx" ones round weights or activations and are used only when a tuned table
allows them (``flashdecode tune --allow-approx``).

Dispatch (paper section 5): a ``Plan`` lists (first M, candidate) ranges; ``Linear.set_plan`` turns it
into a list indexed by M, so picking the kernel for a step is one list lookup. ``configure`` applies
the machine's tuned table (hardware/tuner.py) or, without one, ``default_plan``; ``dataflow="off"``
fixes ``static_candidate`` (the weight format's own kernel) for every M.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import cpu_kernels
from .quant import QuantizedTensor

Plan = list[tuple[int, str]]  # [(first M, candidate), ...], ascending; the last range is unbounded
MAX_PLAN_M = 512  # the table covers M = 1..MAX_PLAN_M; larger M uses the last range
DEFAULT_BF16_NATIVE_MAX_M = 4  # without a table, bf16 weights use the flat GEMM up to this M


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


CANDIDATES = {
    c.name: c
    for c in (
        Candidate("native", True, "flat GEMM, fused dequantization (csrc/flat_gemm.c)"),
        Candidate("dequant_f32", True, "dequantize to fp32, then torch GEMM"),
        Candidate("torch_f32", True, "torch F.linear, fp32 weight"),
        Candidate("torch_bf16", True, "torch F.linear, bf16 weight"),
        Candidate("torch_int4", True, "torch _weight_int4pack_mm_for_cpu, exact Q4 repack"),
        Candidate("dequant_bf16", False, "dequantize to bf16, then torch bf16 GEMM"),
        Candidate("native_i8", False, "int8 activations per 32-block x quantized weights (AVX512-VNNI)"),
        Candidate("torch_bf16_cast", False, "torch F.linear, fp32 weight rounded to bf16"),
    )
}


def weight_format(weight: torch.Tensor | QuantizedTensor) -> str:
    if isinstance(weight, QuantizedTensor):
        return weight.format
    return {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}.get(weight.dtype, "F32")


class Linear:
    def __init__(self, weight: torch.Tensor | QuantizedTensor, bias: torch.Tensor | None = None):
        self.weight = weight if isinstance(weight, QuantizedTensor) else weight.contiguous()
        self.bias = None if bias is None else bias.contiguous()
        self.format = weight_format(self.weight)
        self._impls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        self._by_m: list[Callable[[torch.Tensor], torch.Tensor]] = []
        self._last: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.plan: Plan = []

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.format == "BF16" else torch.float32

    def shape_key(self) -> str:
        """What a tuned table is keyed by: storage format and [N, K]."""
        return f"{self.format}:{self.out_features}x{self.in_features}"

    # --- candidates ------------------------------------------------------------------------------

    def candidates(self, allow_approx: bool = False) -> list[str]:
        """The candidates that can run this weight on this machine."""
        native = cpu_kernels.load() is not None
        if isinstance(self.weight, QuantizedTensor):
            names = ["native"] if native else []
            names += ["dequant_f32"]
            if self.format in ("Q4_0", "Q4_1") and self._int4_repack() is not None:
                names.append("torch_int4")
            if allow_approx:
                names.append("dequant_bf16")
                if native and cpu_kernels.load().has_i8 and self.format in cpu_kernels.I8_FORMATS:
                    names.append("native_i8")
        elif self.format == "BF16":
            names = (["native"] if native else []) + ["torch_bf16"]
        else:
            names = ["torch_f32"] + (["torch_bf16_cast"] if allow_approx else [])
        return names

    def impl(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The callable for candidate ``name``, preparing its weight format once."""
        fn = self._impls.get(name)
        if fn is None:
            fn = self._impls[name] = self._make(name)
        return fn

    def release(self, keep: Iterable[str] = ()) -> None:
        """Drop prepared formats (and their memory) of candidates not in ``keep``."""
        keep = set(keep)
        self._impls = {k: v for k, v in self._impls.items() if k in keep}

    def _make(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        w, bias = self.weight, self.bias
        bias32 = None if bias is None else bias.float().contiguous()
        if name not in self.candidates(allow_approx=True):
            raise ValueError(f"candidate {name!r} cannot run a {self.shape_key()} weight here")

        if name == "native":
            lib = cpu_kernels.load()
            fmt = self.format
            planes = (w.qs, w.d, w.m) if isinstance(w, QuantizedTensor) else (w, None, None)
            n = self.out_features

            def native(x: torch.Tensor) -> torch.Tensor:
                xf = x if x.dtype == torch.float32 and x.stride(-1) == 1 else x.float().contiguous()
                y = lib.linear(fmt, xf, planes, n, bias32)
                return y if x.dtype == torch.float32 else y.to(x.dtype)

            return native
        if name == "native_i8":
            lib = cpu_kernels.load()
            fmt, n = self.format, self.out_features
            packed = cpu_kernels.repack_i8(w)

            def native_i8(x: torch.Tensor) -> torch.Tensor:
                xf = x if x.dtype == torch.float32 and x.stride(-1) == 1 else x.float().contiguous()
                y = lib.linear_i8(fmt, xf, packed, n, bias32)
                return y if x.dtype == torch.float32 else y.to(x.dtype)

            return native_i8
        if name in ("dequant_f32", "dequant_bf16"):
            dtype = torch.float32 if name == "dequant_f32" else torch.bfloat16
            bias_t = None if bias is None else bias.to(dtype)
            lib = cpu_kernels.load()
            if lib is None:  # torch dequantization of the whole matrix per call: slow, but runs

                def dequant_torch(x: torch.Tensor) -> torch.Tensor:
                    return F.linear(x.to(dtype), w.dequantize(dtype), bias_t).to(x.dtype)

                return dequant_torch
            n, k = w.shape
            rows = max(64, min(n, SCRATCH_BYTES // (4 * k)))
            chunks = [(n0, min(n, n0 + rows)) for n0 in range(0, n, rows)]

            def dequant(x: torch.Tensor) -> torch.Tensor:
                # dequantize a cache-sized slab of rows at a time into a reused scratch buffer and
                # multiply it while it is hot: no full-size float copy of the weight ever exists
                xd = x.to(dtype)
                if len(chunks) == 1:
                    y = F.linear(xd, lib.dequant_into(w, 0, n, _scratch(n, k, dtype)), bias_t)
                else:
                    y = torch.empty(x.shape[0], n, dtype=dtype)
                    for n0, n1 in chunks:
                        slab = lib.dequant_into(w, n0, n1, _scratch(n1 - n0, k, dtype))
                        y[:, n0:n1] = F.linear(xd, slab, None if bias_t is None else bias_t[n0:n1])
                return y.to(x.dtype)

            return dequant
        if name in ("torch_f32", "torch_bf16", "torch_bf16_cast"):
            dtype = torch.float32 if name == "torch_f32" else torch.bfloat16
            wt = w if w.dtype == dtype else w.to(dtype)
            bias_t = None if bias is None else bias.to(dtype)

            def torch_linear(x: torch.Tensor) -> torch.Tensor:
                if x.dtype == dtype:
                    return F.linear(x, wt, bias_t)
                return F.linear(x.to(dtype), wt, bias_t).to(x.dtype)

            return torch_linear
        if name == "torch_int4":
            packed, scales_zeros = self._int4_repack()

            def int4(x: torch.Tensor) -> torch.Tensor:
                xf = x.float().contiguous()
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(xf, packed, 32, scales_zeros)
                if bias32 is not None:
                    y = y + bias32
                return y.to(x.dtype)

            return int4
        raise ValueError(f"unknown candidate {name!r}")

    def _int4_repack(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Q4_0/Q4_1 as torch's int4 weight-only format, w = (q - 8) * scale + zero per 32-group, or
        None where that is not exact (the zero m + 8d not representable in fp32) or unsupported."""
        if "_int4" in self.__dict__:
            return self.__dict__["_int4"]
        result = None
        w = self.weight
        op = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
        if isinstance(w, QuantizedTensor) and w.format in ("Q4_0", "Q4_1") and op is not None:
            n, k = w.shape
            d = w.d.float()
            if w.format == "Q4_1":
                exact = w.m.double() + 8 * d.double()
                zero = exact.float()
                ok = bool((zero.double() == exact).all())
            else:
                zero, ok = torch.zeros_like(d), True
            if ok and n % 16 == 0:
                q = torch.cat([w.qs & 0x0F, w.qs >> 4], dim=-1).reshape(n, k).to(torch.int32)
                try:
                    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
                    result = (packed, torch.stack([d.t(), zero.t()], dim=-1).contiguous())
                except RuntimeError:
                    result = None
        self.__dict__["_int4"] = result
        return result

    # --- dispatch --------------------------------------------------------------------------------

    def set_plan(self, plan: Plan) -> None:
        """Follow ``plan`` from now on: M in [plan[i][0], plan[i + 1][0]) runs candidate plan[i][1]."""
        plan = sorted((max(1, int(m)), name) for m, name in plan)
        if not plan:
            raise ValueError("empty plan")
        plan[0] = (1, plan[0][1])
        fns = [self.impl(name) for _, name in plan]
        by_m: list[Callable[[torch.Tensor], torch.Tensor]] = [fns[0]]  # index 0: M = 0 (empty input)
        for i, (start, _) in enumerate(plan):
            end = plan[i + 1][0] if i + 1 < len(plan) else MAX_PLAN_M + 1
            by_m.extend([fns[i]] * max(0, min(end, MAX_PLAN_M + 1) - max(start, len(by_m))))
        self._by_m, self._last, self.plan = by_m, fns[-1], plan
        self.release(keep={name for _, name in plan})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self._by_m:
            self.set_plan(default_plan(self))
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


def fused_linear(
    weights: Sequence[torch.Tensor | QuantizedTensor], biases: Sequence[torch.Tensor] | None = None
) -> Linear | SplitLinear:
    """One Linear over weights concatenated along N (q/k/v, gate/up) when they share a format."""
    bias = None if biases is None else torch.cat(list(biases))
    if all(isinstance(w, QuantizedTensor) for w in weights):
        if len({w.format for w in weights}) == 1:
            return Linear(QuantizedTensor.cat(weights), bias)
    elif not any(isinstance(w, QuantizedTensor) for w in weights):
        return Linear(torch.cat(list(weights)), bias)
    splits = [w.shape[0] for w in weights]
    parts_bias = [None] * len(weights) if bias is None else list(bias.split(splits))
    return SplitLinear([Linear(w, b) for w, b in zip(weights, parts_bias)])


def iter_linears(modules: Iterable[Linear | SplitLinear]) -> Iterable[Linear]:
    for mod in modules:
        if isinstance(mod, SplitLinear):
            yield from mod.parts
        else:
            yield mod


# --- plans ----------------------------------------------------------------------------------------


def static_candidate(linear: Linear) -> str:
    """The one kernel ``dataflow="off"`` uses for every M: the weight format's own kernel."""
    names = linear.candidates()
    if linear.format == "F32":
        return "torch_f32"
    return "native" if "native" in names else names[0]


def default_plan(linear: Linear) -> Plan:
    """Without a tuned table (measured on a 2-core Zen AVX-512 machine): quantized weights use the
    flat GEMM at every M (it beat dequantize + torch's fp32 GEMM at every M up to 512, its fp32 FMA
    loop running faster than torch's); bf16 weights use it up to M = DEFAULT_BF16_NATIVE_MAX_M and
    torch's bf16 GEMM (AVX512-BF16 dot products) above; fp32 weights always use torch."""
    names = linear.candidates()
    if "native" not in names:
        return [(1, names[0])]
    if isinstance(linear.weight, QuantizedTensor):
        return [(1, "native")]
    return [(1, "native"), (DEFAULT_BF16_NATIVE_MAX_M + 1, "torch_bf16")]


def configure(modules: Iterable[Linear | SplitLinear], dataflow: str = "auto", table=None) -> dict[str, int]:
    """Give every Linear its plan: ``dataflow="off"``: the static kernel; ``"auto"``: the tuned table
    for this machine (``table``, else the one in the cache directory) where it has the shape, else the
    default plan. Returns how many Linears got each source of plan."""
    from ..hardware import tuner

    if dataflow not in ("auto", "off"):
        raise ValueError(f"dataflow={dataflow!r}: expected auto or off")
    if dataflow == "auto" and table is None:
        table = tuner.load_table()
    counts = {"table": 0, "default": 0, "static": 0}
    for linear in iter_linears(modules):
        if dataflow == "off":
            linear.set_plan([(1, static_candidate(linear))])
            counts["static"] += 1
            continue
        plan = None if table is None else table.plan_for(linear)
        if plan is not None:
            linear.set_plan(plan)
            counts["table"] += 1
        else:
            linear.set_plan(default_plan(linear))
            counts["default"] += 1
    return counts
