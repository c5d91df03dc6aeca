"""The ctypes face of decode_step.c: a whole model step (every layer, then the final norm) in one call.

``DecodeStep`` holds the C description of a model (per layer: norm weights and, per projection, its
parts' formats and planes) and a reused workspace; ``run`` takes one step's tensors. What the model is
made of comes from above (models/decoder.py builds the ``ProjPart`` lists): this module only lays
tensors out as the C structs expect and keeps them alive. Under tensor parallelism the step calls back
into Python for its two all-reduces a layer (``all_reduce``), on its own buffer as a tensor.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .build import FORMAT_IDS, NativeKernels

KV_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # decode_step.c's KV_*
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}  # the MLP's gate activation: decode_step.c's ACT_*
MAX_PARTS = 3
_i32, _i64, _f32, _vp = ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
_REDUCE = ctypes.CFUNCTYPE(None, _vp, _i64, _vp)  # fd_model.all_reduce


class _Part(ctypes.Structure):
    _fields_ = [("fmt", _i32), ("q8", _i32), ("n", _i64), ("qs", _vp), ("d", _vp), ("m", _vp), ("bias", _vp)]


class _Proj(ctypes.Structure):
    _fields_ = [("nparts", _i32), ("pad", _i32), ("part", _Part * MAX_PARTS)]


class _Layer(ctypes.Structure):
    _fields_ = [
        *((name, _vp) for name in ("attn_norm", "mlp_norm", "qk_norm", "attn_post_norm", "mlp_post_norm")),
        ("cos", _vp),
        ("sin", _vp),
        ("window", _i64),
        ("softcap", _f32),
        ("pad", _i32),
        *((name, _Proj) for name in ("qkv", "o", "gate_up", "down")),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        *(
            (name, _i64)
            for name in ("hidden", "heads", "kv_heads", "head_dim", "inter", "num_layers", "num_slots")
        ),
        ("eps", _f32),
        ("scale", _f32),
        ("kv_dtype", _i32),
        ("unified", _i32),
        ("act", _i32),
        ("pad", _i32),
        ("phi", _vp),
        ("win_lo", _f32),
        ("win_hi", _f32),
        ("norm", _vp),
        ("kv", _vp),
        ("layers", ctypes.POINTER(_Layer)),
        ("all_reduce", _REDUCE),
        ("reduce_ctx", _vp),
    ]


class _AllReduce:
    """fd_model.all_reduce: ``fn`` (the sum over the ranks, in place) on the step's [n] fp32 buffer,
    seen as a tensor without a copy. An exception cannot cross the C frames: the first is kept, the
    step's later calls return at once (its result is void), and ``DecodeStep.run`` raises it."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn
        self.error: BaseException | None = None
        self.c = _REDUCE(self)  # held here: C keeps only the pointer

    def __call__(self, ptr: int, n: int, ctx: int | None) -> None:
        if self.error is not None:
            return
        try:
            buf = torch.frombuffer((ctypes.c_float * n).from_address(ptr), dtype=torch.float32)
            out = self.fn(buf)
            if out.data_ptr() != buf.data_ptr():
                buf.copy_(out)
        except BaseException as exc:  # KeyboardInterrupt too: re-raised once the step is back
            self.error = exc

    def raise_error(self) -> None:
        error, self.error = self.error, None
        if error is not None:
            raise error


# how a part multiplies (decode_step.c's fd_part.q8): fp32 activations, int8 activations on the stored
# planes, or int8 activations on the planes repacked 16 rows at a time (build.py repack_i8)
FP32, INT8, INT8_INTERLEAVED = 0, 1, 2


@dataclass
class ProjPart:
    """One part of a projection: ``fmt`` (a native format or BF16), its planes (qs, d, m) as ``mode``
    reads them, its fp32 bias or None, and its ``out_features``."""

    fmt: str
    planes: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
    bias: torch.Tensor | None
    mode: int
    out_features: int


@dataclass
class LayerWeights:
    """One layer: its norms (``qk_norm`` [heads + kv_heads, head_dim]; the post-norms of the attention
    and MLP outputs, Gemma's), its RoPE tables ``cos``, ``sin`` [max_position, head_dim / 2], its
    sliding ``window`` in keys (None: global) and score ``soft_cap`` (None: none), its projections."""

    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor
    qk_norm: torch.Tensor | None
    attn_post_norm: torch.Tensor | None
    mlp_post_norm: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor
    window: int | None
    soft_cap: float | None
    qkv: Sequence[ProjPart]
    o: Sequence[ProjPart]
    gate_up: Sequence[ProjPart]
    down: Sequence[ProjPart]


@dataclass
class Geometry:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    scale: float
    act: str  # an ACTIVATIONS key


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class DecodeStep:
    def __init__(
        self,
        lib: NativeKernels,
        geometry: Geometry,
        layers: Sequence[LayerWeights],
        norm: torch.Tensor,
        kv: torch.Tensor,
        phi: Sequence[float] | None = None,
        window: tuple[float, float] = (0.0, 0.0),
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        """``kv``: the cache storage [layers, slots, kv_heads, 2, head_dim] (fp32, bf16 or fp16);
        ``phi``: the unified max per layer (None: exact softmax) with its safe ``window``;
        ``all_reduce``: where ``layers`` are one tensor-parallel rank's shard, the in-place sum over
        the ranks of o's and down's partial outputs (None: one process)."""
        self.lib = lib.lib
        self.lib.fd_decode.argtypes = [
            ctypes.POINTER(_Model),
            _i64,
            _vp,
            _vp,
            _vp,
            _vp,
            _i64,
            _vp,
            _vp,
            _vp,
            _i64,
            _vp,
            _i32,
        ]
        self.lib.fd_decode.restype = _i32
        self.lib.fd_decode_workspace.argtypes = [ctypes.POINTER(_Model), _i64, _i64, _i32]
        self.lib.fd_decode_workspace.restype = _i64
        g = geometry
        self._keep: list[torch.Tensor] = [norm, kv]
        self._layers = (_Layer * len(layers))(*(self._layer(w) for w in layers))
        self._phi = None if phi is None else torch.tensor(list(phi), dtype=torch.float32)
        self.model = _Model(
            g.hidden, g.heads, g.kv_heads, g.head_dim, g.intermediate, len(layers), kv.shape[1],
            g.eps, g.scale, KV_DTYPES[kv.dtype], int(phi is not None), ACTIVATIONS[g.act], 0, _ptr(self._phi),
            window[0], window[1], _ptr(norm), _ptr(kv), self._layers,
        )  # fmt: skip
        self._reduce = None if all_reduce is None else _AllReduce(all_reduce)
        if self._reduce is not None:
            self.model.all_reduce = self._reduce.c
        self._workspace = torch.empty(0, dtype=torch.uint8)
        self.stats = torch.zeros(2, dtype=torch.int64)  # rows checked, rows recomputed exactly

    def _proj(self, parts: Sequence[ProjPart]) -> _Proj:
        if not 1 <= len(parts) <= MAX_PARTS:
            raise ValueError(f"a projection of {len(parts)} parts")
        proj = _Proj(len(parts), 0)
        for i, p in enumerate(parts):
            qs, d, m = p.planes
            self._keep += [t for t in (qs, d, m, p.bias) if t is not None]
            proj.part[i] = _Part(
                FORMAT_IDS[p.fmt],
                p.mode,
                p.out_features,
                _ptr(qs),
                _ptr(d),
                _ptr(m),
                _ptr(p.bias),
            )
        return proj

    def _layer(self, w: LayerWeights) -> _Layer:
        norms = (w.attn_norm, w.mlp_norm, w.qk_norm, w.attn_post_norm, w.mlp_post_norm)
        self._keep += [t for t in (*norms, w.cos, w.sin) if t is not None]
        return _Layer(
            *map(_ptr, norms), _ptr(w.cos), _ptr(w.sin), w.window or 0, w.soft_cap or 0.0, 0,
            self._proj(w.qkv), self._proj(w.o), self._proj(w.gate_up), self._proj(w.down),
        )  # fmt: skip

    def run(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        new_slots: torch.Tensor,
        slots: torch.Tensor,
        slot_rows: torch.Tensor,
        lens: torch.Tensor,
        max_len: int,
        num_threads: int,
    ) -> torch.Tensor:
        """x [T, hidden] fp32 contiguous (the embeddings; overwritten with the final hidden states,
        returned); positions, new_slots, lens [T] int64 (``max_len``: the longest); row t's key slots
        are slots[slot_rows[t] : slot_rows[t] + lens[t]] (slots: 1-D int64, rows of one sequence may
        share them). The K and V of the step's rows go to the cache."""
        t = x.shape[0]
        need = self.lib.fd_decode_workspace(ctypes.byref(self.model), t, max_len, num_threads)
        if self._workspace.numel() < need:
            self._workspace = torch.empty(need + need // 4, dtype=torch.uint8)
        rc = self.lib.fd_decode(
            ctypes.byref(self.model), t, x.data_ptr(), positions.data_ptr(), new_slots.data_ptr(),
            slots.data_ptr(), slots.numel(), slot_rows.data_ptr(), lens.data_ptr(),
            self._workspace.data_ptr(), self._workspace.numel(), self.stats.data_ptr(), num_threads,
        )  # fmt: skip
        if self._reduce is not None:
            self._reduce.raise_error()
        if rc != 0:
            raise RuntimeError(f"fd_decode(T={t}) failed with code {rc}")
        return x
