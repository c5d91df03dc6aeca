"""The unified softmax's calibration file (FlashDecoding++ section 3): where it lives, what it holds,
and the ``SoftmaxPolicy`` the engine hands down to attention from it.

``flashdecode calibrate`` (tools/calibrate.py) writes it as JSON in the user cache directory under
``models/<key>/softmax.json``, where the key hashes the model files' identity (path, size, mtime),
so that ``softmax="auto"`` finds it and an edited model is never matched to a stale calibration.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..config import SOFTMAX_MODES
from ..errors import FlashDecodeError
from ..layers.attention import MAX_ABS_PHI, WINDOW_FP16, WINDOW_FP32, SoftmaxPolicy
from ..models.loader import resolve_model_path
from ..utils.paths import cache_dir, read_json, write_json

FORMAT = "flashdecode-softmax-calibration"
VERSION = 1


def model_identity(model: str | Path | None) -> dict[str, Any]:
    """The resolved model path and (name, size, mtime_ns) of its files: what the cache key hashes."""
    path = resolve_model_path(model).resolve()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return {
        "path": str(path),
        "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


def model_key(model: str | Path | None) -> str:
    blob = json.dumps(model_identity(model), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_cache_dir(model: str | Path | None) -> Path:
    """This model's directory for tuned data in the user cache: ``<cache>/models/<key>/``."""
    return cache_dir() / "models" / model_key(model)


def calibration_path(model: str | Path | None) -> Path:
    return model_cache_dir(model) / "softmax.json"


@dataclass
class Calibration:
    phi: list[float]  # one per layer (a per-layer or a repeated global value)
    phi_global: float
    per_layer: bool
    report: dict[str, Any] = field(default_factory=dict)

    def to_json(self, identity: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "flashdecode": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": identity,
            "phi": self.phi,
            "phi_global": self.phi_global,
            "per_layer": self.per_layer,
            "windows": {"fp32": list(WINDOW_FP32), "fp16": list(WINDOW_FP16)},
            **self.report,
        }


def load_calibration(model: str | Path | None, num_layers: int | None = None) -> Calibration | None:
    """The stored calibration of this exact model file(s), or None (missing, stale or unreadable)."""
    data = read_json(calibration_path(model))
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        return None
    phi = data.get("phi")
    ok = isinstance(phi, list) and phi and all(isinstance(p, (int, float)) for p in phi)
    if not ok or (num_layers is not None and len(phi) != num_layers):
        return None
    if not all(math.isfinite(p) and abs(p) <= MAX_ABS_PHI for p in phi):
        return None
    return Calibration(
        phi=[float(p) for p in phi],
        phi_global=float(data.get("phi_global", phi[0])),
        per_layer=bool(data.get("per_layer", True)),
        report={k: v for k, v in data.items() if k in ("calibration", "heldout")},
    )


def save_calibration(model: str | Path | None, calibration: Calibration) -> Path:
    return write_json(calibration_path(model), calibration.to_json(model_identity(model)))


def softmax_policy(
    mode: str, model: str | Path | None, num_layers: int, backend: str = "auto"
) -> SoftmaxPolicy:
    """The engine's softmax for ``mode``: "exact"; "unified" (the model's calibration, else phi = 0:
    any phi is exact, calibration only lowers the fallback rate); "auto" (unified when the model
    has a calibration, else exact). ``backend``: ``SoftmaxPolicy.backend`` ("triton" for the engine's
    triton device backend; the exact mode always runs the torch reference)."""
    if mode not in SOFTMAX_MODES:
        raise FlashDecodeError(f"softmax={mode!r}: expected one of {SOFTMAX_MODES}")
    if mode == "exact":
        return SoftmaxPolicy("exact", backend=backend)
    calibration = load_calibration(model, num_layers)
    if calibration is None:
        return SoftmaxPolicy("unified" if mode == "unified" else "exact", backend=backend)
    return SoftmaxPolicy("unified", phi=tuple(calibration.phi), backend=backend)
