"""GGUF files (llama.cpp's format) -> ``ModelSpec`` + canonical weights + tokenizer.

Matrices in a format with a native kernel (Q4_0, Q4_1, Q8_0 as stored; Q4_K, Q5_K, Q6_K repacked
exactly) become a ``QuantizedTensor`` (layers/quant.py) and run quantized; every other format the ``gguf``
package knows is dequantized here with its reference code. The raw type of every tensor is
recorded for ``flashdecode info``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ..errors import ModelLoadError, UnsupportedArchitectureError
from ..kernels.formats import LOADED_NATIVE
from ..layers.quant import QuantizedTensor
from ..layers.rope import RopeScaling
from ..utils.memory import drop_mapped_pages
from . import gemma, moe
from .gguf_header import GGUFHeader
from .pipeline_parallel import PPStage
from .spec import (
    EXPERT_TENSORS,
    FAMILIES,
    FUSED_TENSORS,
    GLOBAL_TENSORS,
    LAYER_TENSORS,
    ModelSpec,
    expert_name,
    family_for,
    split_experts,
    split_fused,
)
from .tensor_parallel import ShardPlan, TPShard, local_spec
from .tokenizer import Tokenizer
from .weights import LoadedModel

_GLOBAL_TENSORS = {t.gguf: t.name for t in GLOBAL_TENSORS}
_FUSED_TENSORS = {t.gguf: t for t in FUSED_TENSORS}
# a stored tensor that holds several canonical ones: (their names, how to read it as them, in order)
Split = tuple[list[str], Callable[[Any, str], list[Any]]]
# tensors that are model metadata, not weights: popped into the spec by ``load_gguf``
_ROPE_TENSORS = {
    "rope_freqs.weight": "rope_freqs",  # Llama 3's per-frequency divisors
    "rope_factors_long.weight": "rope_factors_long",  # Phi-3's LongRoPE divisors
    "rope_factors_short.weight": "rope_factors_short",
}


def read_gguf(path: str | Path) -> GGUFHeader:
    """Open a GGUF file, turning every way a file can be broken into one ``ModelLoadError``."""
    try:
        return GGUFHeader(path)
    except Exception as exc:  # struct errors, ValueError, UnicodeDecodeError... on bad input
        raise ModelLoadError(f"{path}: not a valid GGUF file ({type(exc).__name__}: {exc})") from exc


def _unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute`` (convert_hf_to_gguf.py), which regroups each head's rows from
    Hugging Face's half-split RoPE layout into interleaved pairs for ggml's "normal" RoPE."""
    if isinstance(w, QuantizedTensor):  # a row permutation moves whole rows of blocks: exact
        return w.map_rows(lambda rows: _unpermute_qk(rows, n_head))
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _spec_from_metadata(meta: dict[str, Any], tensor_names: set[str], tokenizer: Tokenizer) -> ModelSpec:
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelLoadError("GGUF file has no general.architecture")
    family = family_for(arch)
    if arch == "llama" and meta.get("llama.expert_count"):
        family = FAMILIES["mixtral"]  # convert_hf_to_gguf.py writes Mixtral as llama with experts

    def get(key: str, default: Any = None, required: bool = True) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None and required:
            raise ModelLoadError(f"GGUF metadata lacks {arch}.{key}")
        return value

    hidden = int(get("embedding_length"))
    n_head = int(get("attention.head_count"))
    n_kv = get("attention.head_count_kv", n_head)
    if isinstance(n_kv, list):  # per-layer lists exist in some files; all our families use one value
        n_kv = n_kv[0]
    head_dim = int(get("attention.key_length", hidden // n_head if n_head else 0))
    vocab = get("vocab_size", None, required=False) or len(meta.get("tokenizer.ggml.tokens", []))
    rope_scaling = None
    if get("rope.scaling.type", None, required=False) == "linear":
        rope_scaling = RopeScaling(kind="linear", factor=float(get("rope.scaling.factor")))
    if "rope_factors_long.weight" in tensor_names or "rope_factors_short.weight" in tensor_names:
        # Phi-3 LongRoPE as convert_hf_to_gguf.py writes it: the factors as tensors (filled in by
        # load_gguf), the attention factor and the original context as metadata
        original = get("rope.scaling.original_context_length")
        rope_scaling = RopeScaling(
            kind="longrope",
            original_max_position=int(original),
            attention_factor=float(get("rope.scaling.attn_factor", 1.0, required=False)),
        )
    rotary_dim = get("rope.dimension_count", None, required=False)
    rotary_dim = None if rotary_dim is None or int(rotary_dim) == head_dim else int(rotary_dim)
    n_layers = int(get("block_count"))
    extra: dict[str, Any] = {}
    if family.gemma_norms:
        extra = gemma.gguf_fields(get, family.name, n_layers, hidden, n_head, head_dim)
    if family.moe:
        extra = moe.gguf_fields(get, family, n_layers, tensor_names)
    context = int(get("context_length", 2048))
    window = 0 if family.gemma_norms else int(get("attention.sliding_window", 0, required=False))
    if 0 < window < context:
        # Phi-3's converter writes config.json's window, which transformers applies on every layer
        # (llama.cpp's phi3 graph ignores it, so the two differ on sequences longer than the window)
        extra |= {"sliding_window": window, "layer_types": ("sliding_attention",) * n_layers}
    return ModelSpec(
        family=family,
        vocab_size=int(vocab),
        hidden_size=hidden,
        num_layers=n_layers,
        num_heads=n_head,
        num_kv_heads=int(n_kv),
        head_dim=head_dim,
        intermediate_size=int(get("feed_forward_length")),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position=context,
        tie_embeddings="output.weight" not in tensor_names,
        rope_scaling=rope_scaling,
        rotary_dim=rotary_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=tuple(sorted(tokenizer.stop_token_ids)),
        **extra,
    )


def _tensor_to_torch(t: Any, rows: tuple[int, int] | None = None) -> torch.Tensor | QuantizedTensor:
    """``rows``: read only rows [start, end) (of a tensor-parallel shard: models/tensor_parallel.py)."""
    shape = [int(d) for d in reversed(t.shape)]  # ggml lists the fastest-varying dim first
    data = np.asarray(t.data)
    if rows is not None:  # the reader's array has one entry per row (its bytes, for blocks)
        data, shape[0] = data[rows[0] : rows[1]], rows[1] - rows[0]
    if t.tensor_type.name in LOADED_NATIVE and len(shape) == 2:
        # formats with a native kernel keep their blocks (ops/quant.py); the rest are dequantized
        return QuantizedTensor.from_gguf_blocks(t.tensor_type.name, data, shape)
    if t.tensor_type == gguf.GGMLQuantizationType.F32:
        arr = data.astype(np.float32, copy=False)
    elif t.tensor_type == gguf.GGMLQuantizationType.F16:
        arr = data.astype(np.float32)
    elif t.tensor_type == gguf.GGMLQuantizationType.BF16:
        # gguf's reader exposes BF16 as raw uint8/uint16; widen to fp32 by shifting into the high half
        arr = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        arr = gguf.quants.dequantize(data, t.tensor_type)
    if not arr.flags.writeable:  # F32 tensors are read-only views of the memory-mapped file
        arr = arr.copy()
    return torch.from_numpy(np.ascontiguousarray(arr).reshape(shape))


def _expert_tensors(t: Any, spec: ModelSpec, where: str) -> list[torch.Tensor | QuantizedTensor]:
    """A stacked [n_expert, rows, cols] expert tensor as one matrix per expert; a natively run format
    split on its raw blocks, so every expert keeps them."""
    shape = [int(d) for d in reversed(t.shape)]
    if t.tensor_type.name in LOADED_NATIVE and len(shape) == 3:
        blocks = split_experts(np.asarray(t.data), spec, where)
        return [QuantizedTensor.from_gguf_blocks(t.tensor_type.name, b, shape[1:]) for b in blocks]
    return split_experts(_tensor_to_torch(t), spec, where)


def _canonical_names(t: Any, spec: ModelSpec) -> tuple[list[str], Split | None]:
    """The canonical names one stored tensor holds: itself, a fused tensor's parts (Phi-3), or a
    stacked expert tensor's experts; with the split of a tensor that holds several."""
    name = t.name
    if name in _GLOBAL_TENSORS:
        return [_GLOBAL_TENSORS[name]], None
    if name.startswith("blk."):
        _, layer, rest = name.split(".", 2)
        fused = _FUSED_TENSORS.get(rest)
        if layer.isdigit() and fused is not None and fused.when(spec):
            names = [f"layers.{int(layer)}.{part}" for part in fused.parts]
            return names, (
                names,
                lambda t, where: list(split_fused(fused, spec, _tensor_to_torch(t), where).values()),
            )
        stacked = {e.gguf: e.name for e in EXPERT_TENSORS if e.present(spec)}
        if layer.isdigit() and rest in stacked:
            names = [f"layers.{int(layer)}.{expert_name(e, stacked[rest])}" for e in range(spec.num_experts)]
            return names, (names, lambda t, where: _expert_tensors(t, spec, where))
        # a layer's names among the rows present for this spec (a family may store a canonical
        # tensor under its own name: models/spec.py)
        layer_names = {t.gguf: t.name for t in LAYER_TENSORS if t.present(spec)}
        if rest in layer_names and layer.isdigit():
            return [f"layers.{int(layer)}.{layer_names[rest]}"], None
        raise ModelLoadError(f"unexpected tensor {name!r} for architecture {spec.family.name}")
    if name in _ROPE_TENSORS:
        return [_ROPE_TENSORS[name]], None
    raise ModelLoadError(f"unexpected tensor {name!r}")


def _open(path: str | Path) -> tuple[GGUFHeader, ModelSpec, Tokenizer, dict[str, Any], dict[str, Split]]:
    """Reader, spec, tokenizer, the tensors by canonical name (a fused or stacked tensor under each of
    its parts' names) and the split of every such tensor by its GGUF name, without reading any
    tensor data."""
    reader = read_gguf(path)
    meta = reader.meta
    # an unsupported model fails first, by name
    if family_for(str(meta.get("general.architecture"))).opt:
        raise UnsupportedArchitectureError("OPT loads from Hugging Face folders only (llama.cpp has no OPT)")
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    spec = _spec_from_metadata(meta, {t.name for t in reader.tensors}, tokenizer)
    tensors: dict[str, Any] = {}
    fused: dict[str, Split] = {}
    try:
        for t in reader.tensors:
            names, split = _canonical_names(t, spec)
            tensors |= {name: t for name in names}
            if split is not None:
                fused[t.name] = split
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    return reader, spec, tokenizer, tensors, fused


def describe_gguf(path: str | Path) -> tuple[ModelSpec, dict[str, str]]:
    """The spec and the stored format of every tensor (canonical name -> GGUF type name), from the
    header alone: nothing is dequantized."""
    _, spec, _, tensors, _ = _open(path)
    return spec, {name: t.tensor_type.name for name, t in tensors.items()}


def load_gguf(path: str | Path, shard: TPShard | None = None, stage: PPStage | None = None) -> LoadedModel:
    """``shard``: load only this tensor-parallel rank's part of every weight (models/tensor_parallel.py);
    ``stage``: only this pipeline stage's weights (models/pipeline_parallel.py)."""
    reader, spec, tokenizer, tensors, fused = _open(path)
    plan = None if shard is None else ShardPlan(spec, shard)
    weights: dict[str, torch.Tensor] = {}
    formats: dict[str, str] = {}
    for canonical, t in tensors.items():
        if canonical in weights:
            continue  # a fused or stacked tensor's later part: split with its first
        if stage is not None and not stage.holds(canonical, spec.tie_embeddings):
            continue
        where = f"{path}: tensor {t.name!r}"
        try:
            if t.name in fused:
                names, split = fused[t.name]
                parts = dict(zip(names, split(t, where), strict=True))
                weights |= parts if plan is None else {n: plan.cut(n, w) for n, w in parts.items()}
            elif plan is None:
                weights[canonical] = _tensor_to_torch(t)
            else:
                rows = plan.rows(canonical, int(t.shape[-1]))
                w = _tensor_to_torch(t, rows)
                weights[canonical] = w if rows is not None else plan.cut(canonical, w)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"{where} cannot be read (truncated file?): {exc}") from exc
        # copied out: the file's pages of this tensor leave the resident set (utils/memory.py)
        drop_mapped_pages(reader.data, np.asarray(t.data))
    formats |= {canonical: t.tensor_type.name for canonical, t in tensors.items()}
    # Qwen2-MoE's shared-expert gate, [1, hidden] as the converter writes it: llama-quantize writes
    # it 1-D ({n_embd}, the shape llama.cpp's loader asks for)
    for name, shape in spec.tensors().items():
        w = weights.get(name)
        if isinstance(w, torch.Tensor) and w.dim() == 1 and shape[:1] == (1,) and w.shape == shape[1:]:
            weights[name] = w.reshape(shape)

    if "rope_freqs" in weights:
        # llama.cpp bakes Llama-3 RoPE scaling into per-frequency divisors instead of metadata
        factors = tuple(float(f) for f in weights.pop("rope_freqs").flatten())
        spec = spec.with_(rope_scaling=RopeScaling(kind="freq_factors", factors=factors))
    if spec.rope_scaling is not None and spec.rope_scaling.kind == "longrope":
        longrope: dict[str, tuple[float, ...]] = {}
        for kind in ("long", "short"):
            if f"rope_factors_{kind}" not in weights:
                raise ModelLoadError(f"{path}: LongRoPE needs both rope_factors_long and rope_factors_short")
            longrope[kind] = tuple(float(f) for f in weights.pop(f"rope_factors_{kind}").flatten())
        scaling = replace(spec.rope_scaling, long_factors=longrope["long"], short_factors=longrope["short"])
        spec = spec.with_(rope_scaling=scaling)
    if spec.family.gguf_permuted_qk:
        held = spec if shard is None else local_spec(spec, shard.size)  # a shard holds whole heads
        for i in range(spec.num_layers):
            for key, heads in (("q", held.num_heads), ("k", held.num_kv_heads)):
                name = f"layers.{i}.{key}"
                if name in weights:
                    weights[name] = _unpermute_qk(weights[name], heads)
                bias = name + "_bias"
                if bias in weights:
                    weights[bias] = _unpermute_qk(weights[bias], heads)
    return LoadedModel(
        spec=spec,
        weights=weights,
        tokenizer=tokenizer,
        formats=formats,
        source=str(path),
        shard=shard,
        stage=stage,
    )
