"""Hugging Face model folders (config.json + *.safetensors + tokenizer.json) -> ``LoadedModel``.

Only safetensors are read: pickle checkpoints (``*.bin``, ``*.pt``) can run arbitrary code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import ModelLoadError, UnsupportedArchitectureError
from ..layers.rope import RopeScaling
from .spec import (
    GLOBAL_TENSORS,
    HF_ARCHITECTURES,
    HF_MODEL_TYPES,
    LAYER_TENSORS,
    Family,
    ModelSpec,
    family_for,
    supported_architectures,
)
from .tokenizer import Tokenizer
from .weights import LoadedModel

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_TENSORS = {t.hf: t.name for t in LAYER_TENSORS}  # name after "model.layers.N." -> canonical
_GLOBAL_TENSORS = {t.hf: t.name for t in GLOBAL_TENSORS}


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
    raise ModelLoadError(f"unsupported rope scaling {kind!r} (supported: default, linear, llama3)")


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
        theta, scaling = _rope_scaling(config)
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
            head_dim=int(config.get("head_dim") or hidden // n_head),
            intermediate_size=int(config["intermediate_size"]),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position=int(config.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            rope_scaling=scaling,
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
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


def _canonical_name(name: str) -> str | None:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"layers.{int(m.group(1))}.{_LAYER_TENSORS[m.group(2)]}"
    return None


def load_hf_folder(folder: str | Path) -> LoadedModel:
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ModelLoadError(f"{folder}: no config.json (not a Hugging Face model folder)")
    config = _read_json(config_path)
    hf_family(config)  # an unsupported model fails first, by name
    if not (folder / "tokenizer.json").exists():
        raise ModelLoadError(f"{folder}: no tokenizer.json")
    tokenizer = Tokenizer.from_hf_folder(folder)
    spec = spec_from_hf_config(config, tokenizer)

    weights: dict[str, torch.Tensor] = {}
    formats: dict[str, str] = {}
    for file in _safetensors_files(folder):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    canonical = _canonical_name(name)
                    if canonical is None:
                        if name.endswith("rotary_emb.inv_freq"):
                            continue  # a buffer some old checkpoints saved; recomputed from the config
                        raise ModelLoadError(
                            f"{file.name}: unexpected tensor {name!r} for {spec.family.name}"
                        )
                    tensor = f.get_tensor(name)
                    formats[canonical] = str(tensor.dtype).removeprefix("torch.")
                    weights[canonical] = tensor
        except ModelLoadError:
            raise
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
            raise ModelLoadError(f"{file}: cannot read safetensors ({exc})") from exc
    return LoadedModel(spec=spec, weights=weights, tokenizer=tokenizer, formats=formats, source=str(folder))
