"""Hugging Face model folders (config.json + *.safetensors + tokenizer.json) -> ``LoadedModel``.

Only safetensors are read: pickle checkpoints (``*.bin``, ``*.pt``) can run arbitrary code.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import ModelLoadError, UnsupportedArchitectureError
from ..layers.rope import RopeScaling
from . import gemma, moe, opt
from .pipeline_parallel import PPStage
from .spec import (
    EXPERT_TENSORS,
    FUSED_TENSORS,
    GLOBAL_TENSORS,
    HF_ARCHITECTURES,
    HF_MODEL_TYPES,
    LAYER_TENSORS,
    Family,
    FusedDef,
    ModelSpec,
    expert_name,
    family_for,
    split_fused,
    supported_architectures,
)
from .tensor_parallel import ShardPlan, TPShard
from .tokenizer import Tokenizer
from .weights import LoadedModel

_LAYER_RE = re.compile(r"^model\.(?:decoder\.)?layers\.(\d+)\.(.+)$")  # OPT: model.decoder.layers
_GLOBAL_TENSORS = {t.hf: t.name for t in GLOBAL_TENSORS}
_FUSED_TENSORS = {t.hf: t for t in FUSED_TENSORS}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot read JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _rope_scaling(config: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 writes "rope_parameters" (theta inside); older ones "rope_scaling" + "rope_theta"
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "llama3":
        return theta, RopeScaling(
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position=int(params.get("original_max_position_embeddings", 8192)),
        )
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(params["factor"]))
    if kind in ("longrope", "su"):  # Phi-3: transformers' _compute_longrope_parameters
        original = int(
            params.get("original_max_position_embeddings") or config["original_max_position_embeddings"]
        )
        factor = params.get("factor")
        if factor is None:  # Phi-3 leaves it out: the ratio of the extended to the original context
            factor = int(config.get("max_position_embeddings", original)) / original
        attention_factor = params.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return theta, RopeScaling(
            kind="longrope",
            factor=float(factor),
            original_max_position=original,
            short_factors=tuple(float(f) for f in params["short_factor"]),
            long_factors=tuple(float(f) for f in params["long_factor"]),
            attention_factor=float(attention_factor),
        )
    raise ModelLoadError(f"unsupported rope scaling {kind!r} (supported: default, linear, llama3, longrope)")


def _slides(rule: str, layer: int, max_window_layers: int) -> bool:
    """Whether ``layer`` slides under ``Family.hf_window``'s rule (transformers' layer_types defaults)."""
    if rule == "qwen":
        return layer >= max_window_layers
    if rule == "qwen2moe":
        return layer % 2 == 0 and layer < max_window_layers
    return True


def _hf_window(config: dict[str, Any], rule: str, num_layers: int) -> dict[str, Any]:
    """``sliding_window`` and ``layer_types`` as transformers applies config.json's window: Qwen's only
    with ``use_sliding_window`` (its config classes then drop the window), on the layers its
    ``layer_types`` names or its rule picks. Nothing where no layer slides, or where the window is
    the whole context (Phi-4-mini's exceeds it): it would change no score."""
    window = config.get("sliding_window")
    if not rule or not window or (rule != "all" and not config.get("use_sliding_window")):
        return {}
    if int(window) >= int(config.get("max_position_embeddings", 2048)):
        return {}
    # only Qwen's models read layer_types; the others mask every layer alike
    named = tuple(config.get("layer_types") or ()) if rule in ("qwen", "qwen2moe") else ()
    max_window_layers = int(config.get("max_window_layers", 28))
    slides = [_slides(rule, i, max_window_layers) for i in range(num_layers)]
    types = named or tuple("sliding_attention" if s else "full_attention" for s in slides)
    if "sliding_attention" not in types:
        return {}
    return {"sliding_window": int(window), "layer_types": types}


def _rotary_dim(config: dict[str, Any], head_dim: int) -> int | None:
    """``partial_rotary_factor`` (top level, or in transformers 5's rope_parameters) as the number of
    rotated dims, as transformers computes it: int(head_dim * factor). None when every dim rotates."""
    params = config.get("rope_parameters") or {}
    fraction = float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) or 1.0)
    dim = int(head_dim * fraction)
    return None if dim == head_dim else dim


def hf_family(config: dict[str, Any]) -> Family:
    archs = config.get("architectures") or []
    name = next((a for a in archs if a in HF_ARCHITECTURES), None) or HF_MODEL_TYPES.get(
        config.get("model_type")
    )
    if name is None:
        found = (archs or [config.get("model_type")])[0]
        raise UnsupportedArchitectureError(
            f"unsupported architecture {found!r}; supported: {supported_architectures()}"
        )
    return family_for(name)


def spec_from_hf_config(config: dict[str, Any], tokenizer: Tokenizer | None = None) -> ModelSpec:
    family = hf_family(config)
    try:
        hidden = int(config["hidden_size"])
        n_head = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or hidden // n_head)
        extra: dict[str, Any] = {}
        rope_config = config
        if family.gemma_norms:
            rope_config = gemma.hf_rope_config(config, family.name)
            extra = gemma.hf_fields(config, family.name, int(config["num_hidden_layers"]))
        if family.moe:
            extra = moe.hf_fields(config, family, int(config["num_hidden_layers"]))
        extra |= _hf_window(config, family.hf_window, int(config["num_hidden_layers"]))
        if family.opt:
            config = opt.hf_config(config)
            extra = opt.hf_fields(config)
        theta, scaling = _rope_scaling(rope_config)
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        if tokenizer is not None:
            eos_ids = tuple(sorted(set(eos_ids) | set(tokenizer.stop_token_ids)))
        return ModelSpec(
            family=family,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(config["num_hidden_layers"]),
            num_heads=n_head,
            num_kv_heads=int(config.get("num_key_value_heads") or n_head),
            head_dim=head_dim,
            intermediate_size=int(config["intermediate_size"]),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position=int(config.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            rope_scaling=scaling,
            rotary_dim=_rotary_dim(config, head_dim),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
            **extra,
        )
    except ModelLoadError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"config.json is missing or has an invalid field: {exc}") from exc


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index}: no weight_map")
        files = sorted({folder / f for f in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = f" (found {pickles[0]}: pickle checkpoints are not loaded for safety)" if pickles else ""
        raise ModelLoadError(f"{folder}: no *.safetensors weights{hint}")
    for f in files:
        if not f.exists():
            raise ModelLoadError(f"{folder}: shard {f.name} listed in the index is missing")
    return files


def _canonical_name(name: str, spec: ModelSpec) -> str | None:
    """The canonical name of a stored tensor; a layer's among the rows present for ``spec`` (a family
    may store a canonical tensor under its own name: models/spec.py)."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    m = _LAYER_RE.match(name)
    layer_names = {t.hf: t.name for t in LAYER_TENSORS if t.present(spec)}
    if m and m.group(2) in layer_names:
        return f"layers.{int(m.group(1))}.{layer_names[m.group(2)]}"
    for pattern, part in _expert_patterns(spec):
        e = pattern.match(m.group(2)) if m else None
        if e:
            return f"layers.{int(m.group(1))}.{expert_name(int(e.group(1)), part)}"
    return None


def _expert_patterns(spec: ModelSpec) -> list[tuple[re.Pattern[str], str]]:
    """Each expert weight's Hugging Face name (its index as a group) and canonical part."""
    return [
        (re.compile(re.escape(t.hf).replace(re.escape("{expert}"), r"(\d+)") + "$"), t.name)
        for t in EXPERT_TENSORS
        if t.present(spec)
    ]


def _fused(name: str, spec: ModelSpec) -> tuple[int, FusedDef] | None:
    """(layer, definition) when ``name`` is a fused tensor of this family (Phi-3's qkv, gate_up)."""
    m = _LAYER_RE.match(name)
    fused = _FUSED_TENSORS.get(m.group(2)) if m else None
    return (int(m.group(1)), fused) if m and fused is not None and fused.when(spec) else None


def _stored_name(name: str, spec: ModelSpec) -> str:
    """The canonical name of a known stored tensor, a fused one's by its layer alone."""
    fused = _fused(name, spec)
    return f"layers.{fused[0]}." if fused is not None else str(_canonical_name(name, spec))


def _known(name: str, spec: ModelSpec) -> bool:
    return _fused(name, spec) is not None or _canonical_name(name, spec) is not None


def _canonical_tensors(f: Any, name: str, spec: ModelSpec, plan: ShardPlan | None) -> dict[str, Any]:
    """Canonical name -> tensor for one known stored tensor of the open file ``f``: itself, or a fused
    one's parts; with a tensor-parallel ``plan``, this rank's part (only its rows read, where it
    splits by rows)."""
    fused = _fused(name, spec)
    if fused is not None:
        layer, definition = fused
        parts = split_fused(definition, spec, f.get_tensor(name), name)
        out = {f"layers.{layer}.{part}": w for part, w in parts.items()}
    else:
        canonical = str(_canonical_name(name, spec))
        rows = None if plan is None else plan.rows(canonical, f.get_slice(name).get_shape()[0])
        if rows is not None:
            return {canonical: f.get_slice(name)[rows[0] : rows[1]]}
        out = {canonical: f.get_tensor(name)}
    return out if plan is None else {n: plan.cut(n, w) for n, w in out.items()}


def read_hf_config(folder: Path) -> dict[str, Any]:
    """config.json of a Hugging Face folder, whose architecture is supported."""
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ModelLoadError(f"{folder}: no config.json (not a Hugging Face model folder)")
    config = _read_json(config_path)
    hf_family(config)  # an unsupported model fails first, by name
    return config


def load_hf_folder(
    folder: str | Path, shard: TPShard | None = None, stage: PPStage | None = None
) -> LoadedModel:
    """``shard``: load only this tensor-parallel rank's part of every weight (models/tensor_parallel.py);
    ``stage``: only this pipeline stage's weights (models/pipeline_parallel.py)."""
    folder = Path(folder)
    config = read_hf_config(folder)
    if not (folder / "tokenizer.json").exists():
        raise ModelLoadError(f"{folder}: no tokenizer.json")
    tokenizer = Tokenizer.from_hf_folder(folder)
    spec = spec_from_hf_config(config, tokenizer)
    plan = None if shard is None else ShardPlan(spec, shard)

    weights: dict[str, torch.Tensor] = {}
    formats: dict[str, str] = {}
    for file in _safetensors_files(folder):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if not _known(name, spec):
                        if name.endswith("rotary_emb.inv_freq"):
                            continue  # a buffer some old checkpoints saved; recomputed from the config
                        raise ModelLoadError(
                            f"{file.name}: unexpected tensor {name!r} for {spec.family.name}"
                        )
                    if stage is not None and not stage.holds(_stored_name(name, spec), spec.tie_embeddings):
                        continue
                    for canonical, part in _canonical_tensors(f, name, spec, plan).items():
                        formats[canonical] = str(part.dtype).removeprefix("torch.")
                        weights[canonical] = part
        except ModelLoadError:
            raise
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
            raise ModelLoadError(f"{file}: cannot read safetensors ({exc})") from exc
    if spec.family.gemma_norms:
        weights = gemma.offset_norms(weights, spec)
    return LoadedModel(
        spec=spec,
        weights=weights,
        tokenizer=tokenizer,
        formats=formats,
        source=str(folder),
        shard=shard,
        stage=stage,
    )
