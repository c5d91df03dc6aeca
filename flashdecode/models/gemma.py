"""Gemma 2 and Gemma 3 (text): what their checkpoints say that the other families' do not.

The one decoder runs Gemma from data on the spec (models/spec.py): post-norms, the sqrt(hidden)
embedding scale, GeGLU, ``query_pre_attn_scalar``, soft-capping, sliding-window layers and Gemma 3's
local RoPE base. This module reads those fields from a Hugging Face config (transformers'
Gemma2Config / Gemma3TextConfig, old and new layouts) and from GGUF metadata as llama.cpp's
``convert_hf_to_gguf.py`` writes it, and turns Hugging Face's norm weights ``w`` into the ``1 + w``
that GGUF stores and ``rms_norm`` takes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import ModelLoadError
from .spec import ModelSpec

SLIDING, FULL = "sliding_attention", "full_attention"
# every pattern-th layer is global, the others slide: transformers' and llama.cpp's defaults
DEFAULT_PATTERN = {"gemma2": 2, "gemma3": 6}
# transformers' config defaults where a config.json leaves a field out
HF_DEFAULTS = {
    "gemma2": dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rope_theta=10000.0),
    "gemma3": dict(attn_logit_softcapping=None, final_logit_softcapping=None, rope_theta=1_000_000.0),
}
LOCAL_THETA = 10000.0  # Gemma 3's sliding layers, where neither source names theirs
QUERY_PRE_ATTN_SCALAR = 256  # transformers' default
# llama.cpp's attention scale for the 27B models (gemma_pytorch's query_pre_attn_scalar =
# hidden / heads there), known by their layer count: GGUF does not store the scalar
GGUF_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def layer_types(num_layers: int, pattern: int) -> tuple[str, ...]:
    """Sliding layers with every ``pattern``-th layer global (llama.cpp's ``set_swa_pattern``)."""
    if pattern < 1:
        raise ModelLoadError(f"sliding window pattern {pattern} must be positive")
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(num_layers))


def _softcap(value: Any) -> float | None:
    """A soft-cap as the configs write it: a positive number, or None / 0 for none."""
    return float(value) if value else None


def hf_rope_config(config: dict[str, Any], family: str) -> dict[str, Any]:
    """The config as the shared RoPE reader (``safetensors_loader._rope_scaling``) reads the global
    layers' RoPE from: transformers 5 writes Gemma 3's ``rope_parameters`` per layer type, older
    configs ``rope_theta`` and ``rope_scaling``."""
    config = {"rope_theta": HF_DEFAULTS[family]["rope_theta"], **config}
    params = config.get("rope_parameters") or {}
    if FULL not in params and SLIDING not in params:
        return config
    return {**config, "rope_parameters": {"rope_theta": config["rope_theta"], **(params.get(FULL) or {})}}


def _hf_local_theta(config: dict[str, Any], family: str) -> float | None:
    """The sliding layers' RoPE base (Gemma 3: ``rope_parameters["sliding_attention"]`` or
    ``rope_local_base_freq``); None where they share the global layers' tables (Gemma 2)."""
    local = (config.get("rope_parameters") or {}).get(SLIDING)
    if local is not None:
        if local.get("rope_type", "default") != "default":
            raise ModelLoadError(f"unsupported rope scaling {local['rope_type']!r} on sliding layers")
        return float(local.get("rope_theta", LOCAL_THETA))
    if family == "gemma3":
        return float(config.get("rope_local_base_freq") or LOCAL_THETA)
    return None


def hf_fields(config: dict[str, Any], family: str, num_layers: int) -> dict[str, Any]:
    """``ModelSpec`` fields from a Gemma 2 / Gemma 3 config.json (RoPE theta and scaling aside:
    ``hf_rope_config``)."""
    act = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise ModelLoadError(
            f"unsupported hidden_activation {act!r} for {family} (expected gelu_pytorch_tanh)"
        )
    if config.get("use_bidirectional_attention"):
        raise ModelLoadError(f"{family} with use_bidirectional_attention is an encoder, not a causal LM")
    caps = {
        key: config.get(key, HF_DEFAULTS[family][key])
        for key in ("attn_logit_softcapping", "final_logit_softcapping")
    }
    window = config.get("sliding_window")
    types = tuple(config.get("layer_types") or ())
    if not types:
        types = layer_types(num_layers, int(config.get("sliding_window_pattern") or DEFAULT_PATTERN[family]))
    return dict(
        hidden_act="gelu_tanh",
        attention_scale=float(config.get("query_pre_attn_scalar", QUERY_PRE_ATTN_SCALAR)) ** -0.5,
        # transformers' Gemma 3 attention never applies attn_logit_softcapping (llama.cpp's converter
        # asserts it is unset), so only Gemma 2 reads it
        attn_logit_softcap=_softcap(caps["attn_logit_softcapping"]) if family == "gemma2" else None,
        final_logit_softcap=_softcap(caps["final_logit_softcapping"]),
        sliding_window=int(window) if window else None,
        layer_types=types if window else (),
        rope_local_theta=_hf_local_theta(config, family) if window else None,
    )


def gguf_fields(
    get: Callable[..., Any], family: str, num_layers: int, hidden: int, n_head: int, head_dim: int
) -> dict[str, Any]:
    """``ModelSpec`` fields from a gemma2 / gemma3 GGUF's metadata; ``get(key, default, required)``
    reads ``{arch}.key``. Defaults and layer patterns as llama.cpp's loaders (src/models/gemma2.cpp,
    gemma3.cpp) take them."""
    if family == "gemma2":
        window = int(get("attention.sliding_window", 4096, required=False))
        attn_cap = _softcap(get("attn_logit_softcapping", 50.0, required=False))
        final_cap = _softcap(get("final_logit_softcapping", 30.0, required=False))
        local_theta = get("rope.freq_base_swa", None, required=False)
    else:
        window = int(get("attention.sliding_window", 0, required=False))
        attn_cap = None
        final_cap = _softcap(get("final_logit_softcapping", None, required=False))
        local_theta = get("rope.freq_base_swa", LOCAL_THETA, required=False)
    pattern = get("attention.sliding_window_pattern", DEFAULT_PATTERN[family], required=False)
    if isinstance(pattern, list):  # one flag per layer: sliding or not
        if len(pattern) != num_layers:
            raise ModelLoadError(f"sliding_window_pattern has {len(pattern)} entries for {num_layers} layers")
        types = tuple(SLIDING if p else FULL for p in pattern)
    else:
        types = layer_types(num_layers, int(pattern))
    scalar = hidden // n_head if num_layers == GGUF_27B_LAYERS[family] else head_dim
    return dict(
        hidden_act="gelu_tanh",
        attention_scale=float(scalar) ** -0.5,
        attn_logit_softcap=attn_cap,
        final_logit_softcap=final_cap,
        sliding_window=window or None,
        layer_types=types if window else (),
        rope_local_theta=None if local_theta is None or not window else float(local_theta),
    )


def offset_norms(weights: dict[str, Any], spec: ModelSpec) -> dict[str, Any]:
    """Hugging Face's Gemma norm weights ``w`` as the ``1 + w`` that GGUF stores and the decoder
    scales by, computed in fp32 as transformers computes ``1.0 + weight.float()``."""
    norms = set(spec.tensors()) - spec.matrices()
    return {
        name: (w.float() + 1.0) if name in norms and isinstance(w, torch.Tensor) else w
        for name, w in weights.items()
    }
