"""The decoder's decode steps as one native call (kernels/cpu/decode_step.c), where they can be.

A decode batch of T single tokens runs natively when every projection's kernel at M = T is a flat GEMM
(``native``, or ``native_q8`` / ``native_i8`` with int8 activations: the dataflow plan still decides,
per projection and M), the compute dtype is fp32, the KV cache holds fp32, bf16 or fp16, and the softmax
is exact or unified with no calibration observer. The step runs the Llama block, Gemma 2 / 3's
(post-norms, GeGLU, soft-capped scores, sliding-window layers with their own RoPE tables) and mixtures
of experts (layers/moe.py's routing and grouped expert loop, each chosen expert one flat GEMM over its
rows; a router whose plan is its fp32 weight, as llama.cpp stores routers, is read as stored):
``ModelSpec.native_block``. Anything else (an int8 KV cache, a torch kernel in the plan, the Triton
backend, OPT layers) runs the Python layers, which remain the reference: the two compute the same
operations in fp32 and differ only in summation order.

Under tensor parallelism each rank's step runs its shard (the local spec's heads, KV heads and MLP
width) and sums o's and down's partial outputs over the ranks through the decoder's communicator,
called back from C: the same two all-reduces a layer, on the same [T, hidden] rows, as the Python
layers run.

One ``DecodeStep`` is built per combination of the projections' kernels, KV storage and softmax, and
rebuilt only when a plan changes (``Linear.plans_set``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..kernels import cpu
from ..kernels.cpu.decode import (
    ACTIVATIONS,
    FP32,
    INT8,
    INT8_INTERLEAVED,
    KV_DTYPES,
    DecodeStep,
    Geometry,
    LayerWeights,
    MoEWeights,
    ProjPart,
)
from ..layers.attention import AttentionMetadata, SoftmaxPolicy
from ..layers.kv_cache import KVCache
from ..layers.linear import Linear, SplitLinear
from ..layers.moe import GatedMLP, SparseMoE
from ..layers.quant import QuantizedTensor
from ..layers.rope import RotaryEmbedding
from ..utils.threads import AdaptiveTeam
from .spec import ModelSpec

STEP_KERNELS = {"native": FP32, "native_q8": INT8, "native_i8": INT8_INTERLEAVED}  # plan candidate -> mode
# an MoE router whose plan runs its fp32 weight (llama.cpp never quantizes routers): the step reads
# that weight as it is
ROUTER_F32, ROUTER_KERNEL = -1, "torch_f32"


def _parts(mod: Linear | SplitLinear) -> list[Linear]:
    return mod.parts if isinstance(mod, SplitLinear) else [mod]


def _part(lin: Linear, mode: int) -> ProjPart:
    fmt = lin.format
    if mode == INT8_INTERLEAVED:
        planes = lin.i8_repack()
        fmt = cpu.i8_format(fmt, planes)
    else:
        w = lin.weight
        planes = w.planes() if isinstance(w, QuantizedTensor) else (w, None, None)
    return ProjPart(fmt, planes, lin.bias_as(torch.float32), mode, lin.out_features)


def _proj(mod: Linear | SplitLinear, modes) -> list[ProjPart]:
    return [_part(lin, next(modes)) for lin in _parts(mod)]


def _expert(mlp: GatedMLP, modes) -> tuple[list[ProjPart], list[ProjPart]]:
    return _proj(mlp.gate_up, modes), _proj(mlp.down, modes)


def _moe(moe: SparseMoE, modes) -> MoEWeights:
    """``moe`` as the step takes it, its linears' ``modes`` taken in ``SparseMoE.linears()``'s order."""
    mode = next(modes)
    router = moe.router.weight.float().contiguous() if mode == ROUTER_F32 else [_part(moe.router, mode)]
    experts = [_expert(e, modes) for e in moe.experts]
    shared = None if moe.shared is None else _expert(moe.shared, modes)
    gate = None if moe.shared_gate is None else moe.shared_gate.float().reshape(-1).contiguous()
    return MoEWeights(
        router, experts, moe.top_k, moe.renormalize, moe.experts[0].inter, shared, gate,
        0 if moe.shared is None else moe.shared.inter,
    )  # fmt: skip


ROWS_PER_CALL = 256  # rows of one native step call (a longer step runs as several, in order)


def step_rows(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Every query row of a step as the native step takes it: one flat tensor of key slots, each
    row's offset into it, each row's context length, and the longest. Decodes come first, each with
    its own padded slots row; a prompt chunk's rows share their sequence's slots, row i of a chunk
    seeing the keys up to its own position (the cached prefix, the chunk's earlier rows, itself)."""
    slots, rows, lens = [], [], []
    base = 0
    if meta.num_decode:
        padded = meta.decode_slots  # [num_decode, width]
        slots.append(padded.reshape(-1))
        rows.append(torch.arange(meta.num_decode) * padded.shape[1])
        lens.append(meta.decode_context_lens)
        base = padded.numel()
    for seg in sorted(meta.prefills, key=lambda s: s.start):
        slots.append(seg.slots[: seg.context_len])
        rows.append(torch.full((seg.num_query,), base, dtype=torch.int64))
        lens.append(torch.arange(seg.context_len - seg.num_query + 1, seg.context_len + 1))
        base += seg.context_len
    if len(slots) == 1:
        flat = slots[0].contiguous()
    else:
        flat = torch.cat(slots)
    lens_t = lens[0] if len(lens) == 1 else torch.cat(lens)
    max_len = meta.decode_slots.shape[1] if meta.num_decode else 0
    max_len = max([max_len] + [seg.context_len for seg in meta.prefills])
    return flat, torch.cat(rows) if len(rows) > 1 else rows[0], lens_t, max_len


class NativeDecode:
    def __init__(
        self,
        spec: ModelSpec,
        layers: Sequence[Any],
        norm: torch.Tensor,
        rope: RotaryEmbedding,
        dtype: torch.dtype,
        rope_local: RotaryEmbedding | None = None,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        """``layers``: the decoder's ``DecoderLayer``s (their norms, post-norms, ``qk_norm``, window,
        scale and ``projections()``); ``norm``: the final norm's weight; ``rope_local``: the sliding
        layers' RoPE where it is not ``rope`` (Gemma 3); ``all_reduce``: the tensor-parallel sum over
        the ranks (``Communicator.all_reduce``) where ``layers`` hold one rank's shard. Host tensors,
        fp32 compute (else nothing runs natively)."""
        self.spec, self.layers, self.norm, self.dtype = spec, layers, norm, dtype
        self.all_reduce = all_reduce
        self.rope, self.rope_local = rope, rope_local
        self.tables = {  # each RotaryEmbedding's cos and sin as the step reads them
            r: (r.cos.contiguous(), r.sin.contiguous()) for r in (rope, rope_local) if r is not None
        }
        self._chosen: dict[tuple, DecodeStep | None] = {}  # per step shape: the step, or None
        self._steps: dict[tuple, DecodeStep] = {}  # per kernel modes, KV storage and softmax
        self._plans_set = -1
        self._fresh_team()  # threads per step, by timing (utils/threads.py)

    def _fresh_team(self) -> None:
        """A team sized anew, its step times forgotten (they were timed on other kernels or sizes)."""
        self.team = AdaptiveTeam(torch.get_num_threads())

    def step(self, t: int, cache: KVCache, softmax: SoftmaxPolicy | None) -> DecodeStep | None:
        """The native step for a step of ``t`` query rows, or None where the Python layers run.
        Decided once per (t, cache, softmax) until a plan changes: a decode step pays one lookup."""
        if softmax is not None and (softmax.observer is not None or softmax.backend == "triton"):
            return None
        if self._plans_set != Linear.plans_set:  # a plan changed: every cached decision is stale
            self._chosen.clear()
            self._steps.clear()
            self._plans_set = Linear.plans_set
            self._fresh_team()
        unified = softmax is not None and softmax.mode == "unified"
        key = (t, cache.kv.data_ptr(), (softmax.phi, softmax.window) if unified else None)
        if key not in self._chosen:
            self._chosen[key] = self._choose(t, cache, softmax if unified else None)
        return self._chosen[key]

    def run(
        self,
        step: DecodeStep,
        x: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        softmax: SoftmaxPolicy | None,
    ) -> torch.Tensor:
        """The step's final hidden states [T, hidden] from its embeddings ``x``; unified-softmax rows
        checked and recomputed are counted on ``softmax``."""
        slots, slot_rows, lens, max_len = step_rows(meta)
        x = x.contiguous()
        if self.team.most != torch.get_num_threads():
            self._fresh_team()
        # a long prefill chunk in calls of ROWS_PER_CALL rows: the step's workspace grows with its
        # rows (tens of KB each), and a row's keys are in the cache by the time it runs, since rows
        # run in order and each call writes its rows' K/V (a row's result depends on no other row)
        total = x.shape[0]
        for first in range(0, total, ROWS_PER_CALL):
            rows = slice(first, min(first + ROWS_PER_CALL, total))

            def run_on(threads: int, rows: slice = rows) -> None:
                step.run(
                    x[rows], positions[rows], meta.slot_mapping[rows], slots, slot_rows[rows], lens[rows],
                    max_len, threads,
                )  # fmt: skip

            # steps of alike row counts on the same kernels share a record
            self.team.run((id(step), (rows.stop - rows.start).bit_length()), run_on)
        if softmax is not None and softmax.mode == "unified":
            checked, fallbacks = step.stats[:2].tolist()
            softmax.rows_checked += checked
            softmax.fallbacks += fallbacks
            step.stats[:2].zero_()
        return x

    def _choose(self, t: int, cache: KVCache, unified: SoftmaxPolicy | None) -> DecodeStep | None:
        lib = cpu.load()
        if (
            not self.spec.native_block
            or self.spec.hidden_act not in ACTIVATIONS
            or lib is None
            or self.dtype != torch.float32
            or cache.quantized
            or cache.kv.dtype not in KV_DTYPES
        ):
            return None
        routers = {id(layer.mlp.router) for layer in self.layers if isinstance(layer.mlp, SparseMoE)}
        modes = []
        for layer in self.layers:
            for lin in layer.linears():
                name = lin.candidate_at(t)
                if name in STEP_KERNELS:
                    modes.append(STEP_KERNELS[name])
                elif name == ROUTER_KERNEL and id(lin) in routers:
                    modes.append(ROUTER_F32)
                else:
                    return None
        modes = tuple(modes)
        phi = None if unified is None else tuple(unified.phi_at(i) for i in range(len(self.layers)))
        window = (0.0, 0.0) if unified is None else unified.window_for(torch.float32)
        key = (modes, cache.kv.data_ptr(), phi, window)
        if key not in self._steps:
            self._steps[key] = self._build(lib, modes, cache, phi, window)
        return self._steps[key]

    def _build(self, lib, modes, cache: KVCache, phi, window) -> DecodeStep:
        s = self.spec
        it = iter(modes)
        layers = []
        for layer in self.layers:
            sparse = isinstance(layer.mlp, SparseMoE)
            projs = [_proj(mod, it) for mod in layer.projections()[: 2 if sparse else 4]]  # [qkv, o] first
            moe = _moe(layer.mlp, it) if sparse else None
            projs += [[], []] if sparse else []
            # the sliding layers' own RoPE where there is one, as Decoder.forward picks it
            local = layer.sliding_window is not None and self.rope_local is not None
            cos, sin = self.tables[self.rope_local if local else self.rope]
            layers.append(
                LayerWeights(
                    layer.attn_norm, layer.mlp_norm, layer.qk_norm, layer.attn_post_norm, layer.mlp_post_norm,
                    cos, sin, layer.sliding_window, s.attn_logit_softcap, *projs, moe,
                )
            )  # fmt: skip
        geometry = Geometry(
            s.hidden_size,
            s.num_heads,
            s.num_kv_heads,
            s.head_dim,
            s.intermediate_size,
            s.norm_eps,
            self.layers[0].scale,
            s.hidden_act,
        )
        return DecodeStep(lib, geometry, layers, self.norm, cache.kv, phi, window, self.all_reduce)
