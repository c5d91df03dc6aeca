"""The heuristic dataflow (FlashDecoding++ section 5): which linear kernel runs at which M.

Decode and prefill multiply activations of very different heights M by the same weights: a flat
GEMM (section 4) wins at small M, where reading the weights is the whole cost, and other kernels can
win as M grows. Each ``Linear`` (layers/linear.py) follows a ``Plan``, ranges of M with a candidate
each. This module is where plans come from:

* ``static_plan``: the reference, ``dataflow="off"``: the weight format's own kernel at every M;
* ``default_plan``: without a table: quantized weights on the flat GEMM at every M, bf16 weights on
  it up to ``DEFAULT_BF16_NATIVE_MAX_M`` and on torch's bf16 GEMM above, fp32 weights on torch;
  on the triton backend (``device="cuda"``) every weight on the Triton flat GEMM, as with "off";
* a ``DataflowTable``: per shape (storage format and [N, K]), the plan ``flashdecode tune``
  (tools/tune.py) measured on this machine; read by the engine with ``load_table`` and handed to
  ``configure``. Tables live in the cache directory under ``dataflow/<fingerprint>.json``, one per
  hardware fingerprint (CPU model and flags, cores, threads, torch, native kernel build).

Exact candidates differ only in summation order, so greedy text is the same with any exact plan.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import DATAFLOW_MODES
from ..kernels import cpu
from ..utils.cpuinfo import cpu_flags, cpu_model, physical_cores
from ..utils.paths import cache_dir, read_json, write_json
from .linear import CANDIDATES, Linear, Plan, SplitLinear, iter_linears

TABLE_VERSION = 1
DEFAULT_BF16_NATIVE_MAX_M = 4  # without a table, bf16 weights use the flat GEMM up to this M


# --- the plans without a table ----------------------------------------------------------------------


def static_candidate(linear: Linear) -> str:
    """The one kernel ``dataflow="off"`` uses for every M: the weight format's own kernel (on the
    triton backend, the Triton flat GEMM for every format)."""
    names = linear.candidates()
    if "triton" in names:
        return "triton"
    if linear.format == "F32":
        return "torch_f32"
    return "native" if "native" in names else names[0]


def static_plan(linear: Linear) -> Plan:
    return [(1, static_candidate(linear))]


def default_plan(linear: Linear) -> Plan:
    """Quantized weights: the flat GEMM at every M; bf16: the flat GEMM up to
    ``DEFAULT_BF16_NATIVE_MAX_M``, then torch's bf16 GEMM; fp32: torch (docs/dataflow.md has the
    measurements behind these choices). On the triton backend: the Triton flat GEMM at every M."""
    names = linear.candidates()
    if "triton" in names:
        return [(1, "triton")]
    if "native" not in names:
        return [(1, names[0])]
    if linear.quantized:
        return [(1, "native")]
    return [(1, "native"), (DEFAULT_BF16_NATIVE_MAX_M + 1, "torch_bf16")]


def is_approx(name: str) -> bool:
    return name in CANDIDATES and not CANDIDATES[name].exact


# --- tuned tables ------------------------------------------------------------------------------------

# the CPU flags that decide which kernels exist and how fast they are
_RELEVANT_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
    "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve",
)  # fmt: skip


def fingerprint(num_threads: int | None = None) -> dict[str, Any]:
    flags = cpu_flags()
    native = cpu.load()
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "flags": sorted(f for f in _RELEVANT_FLAGS if f in flags),
        "cores": physical_cores(),
        "threads": num_threads or torch.get_num_threads(),
        "torch": torch.__version__,
        # the build's name carries the hash of the kernel source and flags: timings of an older
        # kernel must not drive dispatch, so a rebuilt kernel starts a new table
        "native": None if native is None else native.path.stem,
    }


def fingerprint_key(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def table_path(fp: dict[str, Any] | None = None) -> Path:
    fp = fingerprint() if fp is None else fp
    return cache_dir() / "dataflow" / f"{fingerprint_key(fp)}.json"


@dataclass
class ShapeResult:
    plan: Plan
    times: dict[str, dict[int, float]]  # candidate -> M -> seconds
    crossovers: list[int]  # M at which the plan switches kernel
    allow_approx: bool = False
    # why the tuner's measurements of this shape never settled (then the plan is empty: the shape
    # keeps the default plan); "" when they did
    unsettled: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "plan": [[m, name] for m, name in self.plan],
            "times": {c: {str(m): t for m, t in sorted(ts.items())} for c, ts in self.times.items()},
            "crossovers": self.crossovers,
            "allow_approx": self.allow_approx,
            "unsettled": self.unsettled,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShapeResult:
        return cls(
            plan=[(int(m), str(name)) for m, name in data["plan"]],
            times={c: {int(m): float(t) for m, t in ts.items()} for c, ts in data.get("times", {}).items()},
            crossovers=[int(m) for m in data.get("crossovers", [])],
            allow_approx=bool(data.get("allow_approx", False)),
            unsettled=str(data.get("unsettled", "")),
        )


@dataclass
class DataflowTable:
    fingerprint: dict[str, Any]
    shapes: dict[str, ShapeResult] = field(default_factory=dict)
    models: dict[str, list[str]] = field(default_factory=dict)  # model source -> its shape keys
    gates: dict[str, dict[str, Any]] = field(default_factory=dict)  # model source -> perplexity gate

    def plan_for(self, linear: Linear) -> Plan | None:
        """The tuned plan for this Linear's shape, if the table has it and every kernel in it can run."""
        entry = self.shapes.get(linear.shape_key())
        if entry is None or not entry.plan:
            return None
        usable = set(linear.candidates(allow_approx=entry.allow_approx))
        if not all(name in usable for _, name in entry.plan):
            return None
        return list(entry.plan)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": TABLE_VERSION,
            "fingerprint": self.fingerprint,
            "models": self.models,
            "gates": self.gates,
            "shapes": {key: r.to_json() for key, r in sorted(self.shapes.items())},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DataflowTable:
        if data.get("version") != TABLE_VERSION:
            raise ValueError(f"table version {data.get('version')!r}, expected {TABLE_VERSION}")
        return cls(
            fingerprint=dict(data["fingerprint"]),
            shapes={k: ShapeResult.from_json(v) for k, v in data.get("shapes", {}).items()},
            models={k: list(v) for k, v in data.get("models", {}).items()},
            gates=dict(data.get("gates", {})),
        )

    def save(self, path: Path | None = None) -> Path:
        return write_json(table_path(self.fingerprint) if path is None else path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> DataflowTable | None:
        """The table at ``path``, or None when it is missing or malformed in any way."""
        try:
            return cls.from_json(read_json(path))
        except (AttributeError, ValueError, KeyError, TypeError):
            return None


def load_table(num_threads: int | None = None) -> DataflowTable | None:
    """This machine's table (for the current thread count), or None if it was never tuned."""
    fp = fingerprint(num_threads)
    table = DataflowTable.load(table_path(fp))
    if table is None or table.fingerprint != fp:
        return None
    return table


def configure(
    modules: Iterable[Linear | SplitLinear], dataflow: str = "auto", table: DataflowTable | None = None
) -> dict[str, int]:
    """Give every Linear its plan: ``dataflow="off"``: ``static_plan``; ``"auto"``: ``table``'s plan
    where it has the shape, else ``default_plan``. Returns how many Linears got each kind of plan."""
    if dataflow not in DATAFLOW_MODES:
        raise ValueError(f"dataflow={dataflow!r}: expected one of {DATAFLOW_MODES}")
    counts = {"table": 0, "default": 0, "static": 0}
    for linear in iter_linears(modules):
        if dataflow == "off":
            plan, kind = static_plan(linear), "static"
        else:
            plan = None if table is None else table.plan_for(linear)
            kind = "default" if plan is None else "table"
        linear.set_plan(plan or default_plan(linear))
        counts[kind] += 1
    return counts


def format_plan(plan: Plan) -> str:
    parts = []
    for i, (start, name) in enumerate(plan):
        end = plan[i + 1][0] - 1 if i + 1 < len(plan) else None
        rng = f"M>={start}" if end is None else (f"M={start}" if end == start else f"M={start}-{end}")
        parts.append(f"{rng}: {name}")
    return ", ".join(parts)
