"""Mixtral, Qwen2-MoE and Qwen3-MoE: what their checkpoints say about the experts.

The routing and the grouped expert loop are layers/moe.py; this module reads the expert fields from a
Hugging Face config (transformers' MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig) and from GGUF
metadata as llama.cpp's ``convert_hf_to_gguf.py`` writes it, and builds a layer's ``SparseMoE`` from
its canonical weights (models/spec.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import ModelLoadError
from ..layers.linear import Linear, fused_linear
from ..layers.moe import Activation, GatedMLP, SparseMoE
from .spec import Family, ModelSpec, expert_name

ROUTER_GGUF = "ffn_gate_inp.weight"


def hf_fields(config: dict[str, Any], family: Family, num_layers: int) -> dict[str, Any]:
    """``ModelSpec`` fields from a Mixtral / Qwen2-MoE / Qwen3-MoE config.json."""
    # Mixtral names its count num_local_experts, Qwen num_experts (transformers 5 writes either)
    experts = config.get("num_local_experts") or config.get("num_experts")
    inter = config.get("intermediate_size" if family.name == "mixtral" else "moe_intermediate_size")
    if not experts:
        raise ModelLoadError(f"{family.name} config without experts (num_experts={experts!r})")
    # transformers' Qwen MoE layers: sparse unless listed in mlp_only_layers, every decoder_sparse_step-th
    step = int(config.get("decoder_sparse_step") or 1)
    only = set(config.get("mlp_only_layers") or ())
    dense = tuple(i for i in range(num_layers) if i in only or (i + 1) % step)
    return dict(
        num_experts=int(experts),
        num_experts_per_tok=int(config.get("num_experts_per_tok", 2)),
        moe_intermediate_size=int(inter),
        shared_expert_intermediate_size=int(config.get("shared_expert_intermediate_size") or 0)
        if family.shared_expert
        else 0,
        # Mixtral always renormalises; transformers' Qwen configs default to not
        norm_topk_prob=family.name == "mixtral" or bool(config.get("norm_topk_prob", False)),
        dense_layers=dense,
    )


def gguf_fields(
    get: Callable[..., Any], family: Family, num_layers: int, tensor_names: set[str]
) -> dict[str, Any]:
    """``ModelSpec`` fields from an MoE GGUF's metadata (``get(key, default, required)`` reads
    ``{arch}.key``). llama.cpp keeps Mixtral's expert width in ``feed_forward_length`` and hard-codes
    the renormalisation per family (off for qwen2moe); a layer without a router is dense."""
    inter = get("expert_feed_forward_length", None, required=family.name != "mixtral")
    norm = get("expert_weights_norm", family.moe_norm_topk, required=False)
    return dict(
        num_experts=int(get("expert_count")),
        num_experts_per_tok=int(get("expert_used_count")),
        moe_intermediate_size=int(inter if inter is not None else get("feed_forward_length")),
        shared_expert_intermediate_size=int(get("expert_shared_feed_forward_length", 0, required=False))
        if family.shared_expert
        else 0,
        norm_topk_prob=bool(norm),
        dense_layers=tuple(
            i for i in range(num_layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensor_names
        ),
    )


def _gated(w: dict[str, Any], names: tuple[str, str, str], act: Activation, backend: str) -> GatedMLP:
    gate, up, down = (w[n] for n in names)
    return GatedMLP(fused_linear([gate, up], backend=backend), Linear(down, backend=backend), act)


def sparse_moe(
    spec: ModelSpec, w: dict[str, torch.Tensor], prefix: str, act: Activation, backend: str
) -> SparseMoE:
    """The MoE MLP of the layer whose weights are under ``prefix`` (``layers.N.``)."""
    experts = [
        _gated(w, tuple(prefix + expert_name(e, n) for n in ("gate", "up", "down")), act, backend)
        for e in range(spec.num_experts)
    ]
    shared = shared_gate = None
    if prefix + "shared_gate" in w:
        shared = _gated(
            w, tuple(prefix + n for n in ("shared_gate", "shared_up", "shared_down")), act, backend
        )
        shared_gate = w[prefix + "shared_expert_gate"]
    router = Linear(w[prefix + "router"], backend=backend)
    return SparseMoE(router, experts, spec.num_experts_per_tok, spec.norm_topk_prob, shared, shared_gate)
