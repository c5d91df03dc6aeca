"""Architectures as data.

A ``ModelSpec`` holds everything the one decoder (``models/decoder.py``) needs to run a model; a
family (Llama, Mistral, Qwen2, ...) is a set of feature flags in ``FAMILIES``, not a model file.
Both loaders (GGUF and Hugging Face) produce a ``ModelSpec`` plus weights under the canonical names
listed in ``weight_names``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import ModelLoadError, UnsupportedArchitectureError


@dataclass(frozen=True)
class Family:
    """What distinguishes one decoder-only family from the plain Llama block."""

    name: str
    qkv_bias: bool = False  # Qwen2: biases on q, k and v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    gguf_permuted_qk: bool = False  # llama.cpp's converter reorders Q/K rows for interleaved RoPE


# Keyed by the name GGUF files use in ``general.architecture``.
FAMILIES: dict[str, Family] = {
    "llama": Family("llama", gguf_permuted_qk=True),
    "mistral": Family("mistral", gguf_permuted_qk=True),
    "qwen2": Family("qwen2", qkv_bias=True),
    "qwen3": Family("qwen3", qk_norm=True),
}

# Hugging Face ``config.json`` "architectures" / "model_type" -> family.
HF_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
HF_MODEL_TYPES: dict[str, str] = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


def supported_architectures() -> str:
    return ", ".join(sorted(set(HF_ARCHITECTURES) | set(FAMILIES)))


def family_for(name: str) -> Family:
    family = FAMILIES.get(name) or FAMILIES.get(HF_ARCHITECTURES.get(name, ""))
    if family is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {name!r}; supported: {supported_architectures()}"
        )
    return family


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: "llama3" (Llama 3.1's smooth NTK-by-parts), "linear" (positions divided
    by ``factor``) or "freq_factors" (explicit per-frequency divisors, as GGUF files store Llama 3's)."""

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    factors: tuple[float, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float
    max_position: int
    tie_embeddings: bool
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "max_position",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)!r} must be a positive integer")
        if not problems and self.num_heads % self.num_kv_heads:
            problems.append(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if problems:
            raise ModelLoadError("invalid model config: " + "; ".join(problems))

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def with_(self, **changes: Any) -> ModelSpec:
        return replace(self, **changes)

    def weight_names(self) -> list[str]:
        """The canonical weight names the decoder expects, in load order."""
        names = ["embed"]
        for i in range(self.num_layers):
            p = f"layers.{i}."
            names += [p + n for n in ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down")]
            if self.family.qkv_bias:
                names += [p + "q_bias", p + "k_bias", p + "v_bias"]
            if self.family.qk_norm:
                names += [p + "q_norm", p + "k_norm"]
        names.append("norm")
        if not self.tie_embeddings:
            names.append("lm_head")
        return names

    def num_parameters(self) -> int:
        h, kv, inter = self.hidden_size, self.kv_size, self.intermediate_size
        per_layer = h * self.q_size + 2 * h * kv + self.q_size * h + 3 * h * inter + 2 * h
        if self.family.qkv_bias:
            per_layer += self.q_size + 2 * kv
        if self.family.qk_norm:
            per_layer += 2 * self.head_dim
        head = 0 if self.tie_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * per_layer + h + head
