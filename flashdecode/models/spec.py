"""Architectures as data.

A ``ModelSpec`` holds everything the one decoder (``models/decoder.py``) needs to run a model; a
family (Llama, Mistral, Qwen2, ...) is a set of feature flags in ``FAMILIES``, not a model file.
``TENSORS`` is the one list of the weights a model has: canonical name, GGUF and Hugging Face names,
shape, and whether it is a projection matrix. Both loaders (GGUF and Hugging Face) read it to map
names and produce a ``ModelSpec`` plus weights under the canonical names of ``ModelSpec.tensors``;
the decoder, load-time quantization and the roofline read it too.

A new family: one ``FAMILIES`` entry (and its Hugging Face names below), its extra tensors in
``TENSORS`` behind a ``when``, and, only where its math differs, a small module of its own.
``FUSED_TENSORS`` lists stored tensors that stack several canonical ones along their rows (Phi-3's
qkv and gate_up): the loaders split them into the canonical parts (the decoder fuses them again).
A canonical name may have several ``TENSORS`` rows, each behind its own ``when``, where families store
it under different names (Gemma's ``pre_feedforward_layernorm`` is the MLP norm that Llama calls
``post_attention_layernorm``); for any one spec at most one of them is present.
Mixture of experts (``Family.moe``): a layer's ``mlp`` rows say whether it exists in dense or in MoE
layers (router, shared expert); ``EXPERT_TENSORS`` lists one expert's weights, canonical
``layers.N.experts.E.gate`` etc., which GGUF stores stacked over the experts (``split_experts``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import ModelLoadError, UnsupportedArchitectureError
from ..layers.rope import RopeScaling


@dataclass(frozen=True)
class Family:
    """What distinguishes one decoder-only family from the plain Llama block."""

    name: str
    qkv_bias: bool = False  # Qwen2: biases on q, k and v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    gguf_permuted_qk: bool = False  # llama.cpp's converter reorders Q/K rows for interleaved RoPE
    # How config.json's sliding_window (below max_position_embeddings) applies, as transformers'
    # config classes and models apply it (safetensors_loader._hf_window): "all" layers (Mistral,
    # Mixtral, Phi-3); with use_sliding_window only, "qwen": layers from max_window_layers on (Qwen2,
    # Qwen3), "qwen2moe": even-indexed layers below max_window_layers, "qwen3moe": all layers; "": none
    # (Gemma reads its own). GGUF carries a window for phi3 only (llama.cpp's llama and qwen
    # architectures attend globally)
    hf_window: str = ""
    fused_projections: bool = False  # Phi-3: q/k/v stored as one qkv matrix, gate/up as one (FUSED_TENSORS)
    # Gemma 2/3: RMSNorm after attention and after the MLP too (post_attention_norm, post_ffw_norm),
    # embeddings scaled by sqrt(hidden_size), and norms that scale by (1 + w) in fp32: Hugging Face
    # stores w, GGUF 1 + w; the loaders hand the decoder 1 + w (models/gemma.py)
    gemma_norms: bool = False
    # mixture of experts (models/moe.py); moe_norm_topk: whether llama.cpp renormalises the chosen
    # top-k where a GGUF does not say (off for qwen2moe); shared_expert: layers may carry a shared
    # expert behind a sigmoid gate (Qwen2-MoE)
    moe: bool = False
    moe_norm_topk: bool = True
    shared_expert: bool = False
    # OPT (models/opt.py): LayerNorm with biases, learned positions (offset 2) in place of RoPE, a
    # plain fc1 -> ReLU -> fc2 MLP, biases on every projection
    opt: bool = False


# Keyed by the name GGUF files use in ``general.architecture``.
FAMILIES: dict[str, Family] = {
    "llama": Family("llama", gguf_permuted_qk=True),
    "mistral": Family("mistral", gguf_permuted_qk=True, hf_window="all"),
    "qwen2": Family("qwen2", qkv_bias=True, hf_window="qwen"),
    "qwen3": Family("qwen3", qk_norm=True, hf_window="qwen"),
    "phi3": Family("phi3", fused_projections=True, hf_window="all"),
    "gemma2": Family("gemma2", gemma_norms=True),
    "gemma3": Family("gemma3", qk_norm=True, gemma_norms=True),
    # GGUF files name Mixtral "llama" (convert_hf_to_gguf.py); the loader tells them apart by expert_count
    "mixtral": Family("mixtral", gguf_permuted_qk=True, moe=True, hf_window="all"),
    "qwen2moe": Family(
        "qwen2moe", qkv_bias=True, moe=True, moe_norm_topk=False, shared_expert=True, hf_window="qwen2moe"
    ),
    "qwen3moe": Family("qwen3moe", qk_norm=True, moe=True, hf_window="qwen3moe"),
    "opt": Family("opt", qkv_bias=True, opt=True),
}

# Hugging Face ``config.json`` "architectures" / "model_type" -> family.
HF_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2moe",
    "Qwen3MoeForCausalLM": "qwen3moe",
    "OPTForCausalLM": "opt",
}
HF_MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "mixtral": "mixtral",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "opt": "opt",
}


def supported_architectures() -> str:
    return ", ".join(sorted(set(HF_ARCHITECTURES) | set(FAMILIES)))


def family_for(name: str) -> Family:
    family = FAMILIES.get(name) or FAMILIES.get(HF_ARCHITECTURES.get(name, ""))
    if family is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {name!r}; supported: {supported_architectures()}"
        )
    return family


ACTIVATIONS = ("silu", "gelu_tanh", "relu")
LAYER_TYPES = ("sliding_attention", "full_attention")


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
    rotary_dim: int | None = (
        None  # the dims of each head RoPE rotates (Phi-3's partial_rotary_factor); None: all
    )
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    hidden_act: str = "silu"  # the MLP's gate activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    attention_scale: float | None = None  # q.k multiplier; None: head_dim ** -0.5
    attn_logit_softcap: float | None = None  # scores become cap * tanh(s / cap) before the softmax
    final_logit_softcap: float | None = None  # the same on the logits
    sliding_window: int | None = None  # a sliding layer's query at p sees keys in (p - window, p]
    layer_types: tuple[str, ...] = ()  # per layer "sliding_attention" or "full_attention"; (): all full
    rope_local_theta: float | None = None  # sliding layers' RoPE base, unscaled (Gemma 3); None: rope_theta
    # mixture of experts (family.moe): each MoE layer routes a token to num_experts_per_tok of its
    # num_experts SwiGLU experts of moe_intermediate_size; dense_layers keep the dense MLP of
    # intermediate_size (Qwen's mlp_only_layers / decoder_sparse_step)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's shared expert; 0: none
    norm_topk_prob: bool = True
    dense_layers: tuple[int, ...] = ()
    # OPT: norms before attention and the MLP (do_layer_norm_before), else after each residual add;
    # the embeddings' width where it differs from hidden_size (word_embed_proj_dim: project_in/out)
    norm_before: bool = True
    embed_dim: int | None = None
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
        if not problems and self.rotary_dim is not None:
            if not isinstance(self.rotary_dim, int) or self.rotary_dim % 2 or self.head_dim % 2:
                problems.append(f"rotary_dim={self.rotary_dim!r} and head_dim={self.head_dim} must be even")
            elif not 0 < self.rotary_dim <= self.head_dim:
                problems.append(f"rotary_dim={self.rotary_dim} must be in 1..head_dim={self.head_dim}")
        problems += self._layer_problems() + self._moe_problems()
        if problems:
            raise ModelLoadError("invalid model config: " + "; ".join(problems))

    def _layer_problems(self) -> list[str]:
        problems = []
        if self.hidden_act not in ACTIVATIONS:
            problems.append(f"hidden_act={self.hidden_act!r} must be one of {sorted(ACTIVATIONS)}")
        for name in ("attention_scale", "attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, float) and math.isfinite(value) and value > 0):
                problems.append(f"{name}={value!r} must be a positive number")
        if self.layer_types:
            if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES):
                problems.append(
                    f"layer_types must name one of {LAYER_TYPES} for each of {self.num_layers} layers"
                )
            elif "sliding_attention" in self.layer_types and not (
                isinstance(self.sliding_window, int) and self.sliding_window > 0
            ):
                problems.append(f"sliding layers need a positive sliding_window, got {self.sliding_window!r}")
        return problems

    def _moe_problems(self) -> list[str]:
        if not self.family.moe:
            return []
        problems = [
            f"{name}={getattr(self, name)!r} must be a positive integer"
            for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size")
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0
        ]
        if not problems and self.num_experts_per_tok > self.num_experts:
            problems.append(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds num_experts={self.num_experts}"
            )
        if not set(self.dense_layers) <= set(range(self.num_layers)):
            problems.append(f"dense_layers={self.dense_layers} name layers outside 0..{self.num_layers - 1}")
        return problems

    def moe_at(self, layer: int) -> bool:
        """Whether ``layer``'s MLP is a mixture of experts."""
        return self.family.moe and layer not in self.dense_layers

    @property
    def native_block(self) -> bool:
        """The block the native decode step implements: pre-norm RMSNorm layers with a gated MLP,
        dense (Llama's or Gemma's: post-norms, GeGLU, any attention scale, soft-capped scores,
        sliding-window layers with their own RoPE base) or a mixture of experts (Mixtral, Qwen2-MoE's
        shared expert, Qwen3-MoE); not OPT's LayerNorm block."""
        return not self.family.opt

    def window_at(self, layer: int) -> int | None:
        """The sliding window of ``layer``, or None where it attends to every earlier position."""
        if self.layer_types and self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def cache_sliding_window(self) -> int | None:
        """W where every layer slides within a window of W, so that the KV cache may drop a
        sequence's blocks before its last W positions (engine/block_manager.py); None where some
        layer attends globally (Gemma's alternating layers): that layer sees every position, so no
        block can go."""
        if self.layer_types and all(t == "sliding_attention" for t in self.layer_types):
            return self.sliding_window
        return None

    def features(self) -> list[str]:
        """What this model does beyond the plain Llama block, in words (``flashdecode info``)."""
        f = self.family
        flags = (
            ("q/k/v biases", f.qkv_bias),
            ("q/k norm", f.qk_norm),
            ("fused projections", f.fused_projections),
            ("post-norms, (1 + w) RMSNorm, sqrt(hidden) embedding scale", f.gemma_norms),
            ("GeGLU (tanh GELU)", self.hidden_act == "gelu_tanh"),
            ("LayerNorm, learned positions, ReLU MLP, biases", f.opt),
            ("norms after the residual adds", not self.norm_before),
        )
        out = [name for name, on in flags if on]
        if self.embed_dim is not None:
            out.append(f"embeddings {self.embed_dim} wide, projected to {self.hidden_size}")
        if self.rotary_dim is not None:
            out.append(f"partial rotary {self.rotary_dim}/{self.head_dim}")
        for label, value in (
            ("attention scale", self.attention_scale),
            ("attention soft-cap", self.attn_logit_softcap),
            ("final soft-cap", self.final_logit_softcap),
        ):
            if value is not None:
                out.append(f"{label} {value:g}")
        if self.family.moe:
            moe = sum(self.moe_at(i) for i in range(self.num_layers))
            shared = (
                f", shared expert {self.shared_expert_intermediate_size}"
                if self.shared_expert_intermediate_size
                else ""
            )
            out.append(
                f"mixture of experts: top {self.num_experts_per_tok} of {self.num_experts} experts of "
                f"{self.moe_intermediate_size} on {moe}/{self.num_layers} layers{shared}"
            )
        sliding = sum(self.window_at(i) is not None for i in range(self.num_layers))
        if sliding:
            local = f", local rope theta {self.rope_local_theta:g}" if self.rope_local_theta else ""
            out.append(f"sliding window {self.sliding_window} on {sliding}/{self.num_layers} layers{local}")
        return out

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def embed_size(self) -> int:
        """The embedding's (and tied head's) width."""
        return self.hidden_size if self.embed_dim is None else self.embed_dim

    @property
    def position_rows(self) -> int:
        """OPT's learned position table: max_position rows after its offset of 2."""
        return self.max_position + 2

    def with_(self, **changes: Any) -> ModelSpec:
        return replace(self, **changes)

    def tensor_defs(self) -> dict[str, TensorDef]:
        """Canonical name -> definition of every weight this model has."""
        out = {t.name: t for t in GLOBAL_TENSORS if t.present(self)}
        for i in range(self.num_layers):
            moe = self.moe_at(i)
            rows = [
                t for t in LAYER_TENSORS if t.present(self) and t.mlp in (None, "moe" if moe else "dense")
            ]
            out |= {f"layers.{i}.{t.name}": t for t in rows}
            if moe:
                for e in range(self.num_experts):
                    out |= {
                        f"layers.{i}.{expert_name(e, t.name)}": t for t in EXPERT_TENSORS if t.present(self)
                    }
        return out

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Canonical name -> shape of every weight this model has."""
        return {name: t.shape(self) for name, t in self.tensor_defs().items()}

    def weight_names(self) -> list[str]:
        return list(self.tensors())

    def matrices(self) -> set[str]:
        """The weights that are projection matrices (the embedding too: it serves a tied head)."""
        return {name for name, t in self.tensor_defs().items() if t.matrix}

    def num_parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.tensors().values())


# How tensor parallelism (Megatron's layout, models/tensor_parallel.py) splits a weight over T ranks:
# "column" by output rows, "kv" by output rows of whole KV heads (replicated where T exceeds them),
# "row" by input columns (the partial outputs are summed by one all-reduce), "vocab" by vocabulary
# rows, "row_bias" the bias of a "row" projection (rank 0 holds it, so the sum adds it once)
TP_SPLITS = ("column", "kv", "row", "vocab", "row_bias")


@dataclass(frozen=True)
class TensorDef:
    """One weight: canonical name (after ``layers.N.`` for a layer's), GGUF name (after ``blk.N.``),
    Hugging Face name (after ``model.layers.N.``), shape, and the condition under which it exists."""

    name: str
    gguf: str
    hf: str
    shape: Callable[[ModelSpec], tuple[int, ...]]
    matrix: bool = False  # a projection: runs through a Linear, counted as matmul work, quantizable
    when: Callable[[ModelSpec], bool] | None = None
    mlp: str | None = None  # "dense" / "moe": only in layers whose MLP is dense / a mixture of experts
    tp: str | None = None  # how tensor parallelism splits it (``TP_SPLITS``); None: every rank holds it

    def __post_init__(self) -> None:
        if self.tp is not None and self.tp not in TP_SPLITS:
            raise ValueError(f"{self.name}: tp={self.tp!r}, expected None or one of {TP_SPLITS}")

    def present(self, spec: ModelSpec) -> bool:
        return self.when is None or self.when(spec)


def _dims(*fields: str) -> Callable[[ModelSpec], tuple[int, ...]]:
    """The shape whose dims are these ``ModelSpec`` fields."""
    return lambda spec: tuple(getattr(spec, f) for f in fields)


_hidden = _dims("hidden_size")
_up = _dims("intermediate_size", "hidden_size")  # gate and up
_vocab = _dims("vocab_size", "embed_size")  # embedding and head
_down = _dims("hidden_size", "intermediate_size")
_expert_up = _dims("moe_intermediate_size", "hidden_size")
_expert_down = _dims("hidden_size", "moe_intermediate_size")
_router = _dims("num_experts", "hidden_size")
_shared_up = _dims("shared_expert_intermediate_size", "hidden_size")
_shared_down = _dims("hidden_size", "shared_expert_intermediate_size")


def _qkv_bias(s: ModelSpec) -> bool:
    return s.family.qkv_bias


def _qk_norm(s: ModelSpec) -> bool:
    return s.family.qk_norm


def _untied(s: ModelSpec) -> bool:
    return not s.tie_embeddings


def _shared_expert(s: ModelSpec) -> bool:
    return s.family.shared_expert and s.shared_expert_intermediate_size > 0


def _mixtral(s: ModelSpec) -> bool:
    return s.family.name == "mixtral"


def _qwen_moe(s: ModelSpec) -> bool:
    return s.family.moe and s.family.name != "mixtral"


def _opt(s: ModelSpec) -> bool:
    return s.family.opt


def _not_opt(s: ModelSpec) -> bool:
    return not s.family.opt


def _opt_final_norm(s: ModelSpec) -> bool:
    return s.family.opt and s.norm_before


def _projected(s: ModelSpec) -> bool:
    return s.embed_dim is not None


def _gemma(s: ModelSpec) -> bool:
    return s.family.gemma_norms


def _llama_norms(s: ModelSpec) -> bool:
    return not s.family.gemma_norms and not s.family.opt


LAYER_TENSORS = (
    TensorDef("attn_norm", "attn_norm.weight", "input_layernorm.weight", _hidden, when=_not_opt),
    TensorDef("attn_norm", "attn_norm.weight", "self_attn_layer_norm.weight", _hidden, when=_opt),
    TensorDef("attn_norm_bias", "attn_norm.bias", "self_attn_layer_norm.bias", _hidden, when=_opt),
    TensorDef("q", "attn_q.weight", "self_attn.q_proj.weight", _dims("q_size", "hidden_size"), True,
              tp="column"),
    TensorDef("k", "attn_k.weight", "self_attn.k_proj.weight", _dims("kv_size", "hidden_size"), True,
              tp="kv"),
    TensorDef("v", "attn_v.weight", "self_attn.v_proj.weight", _dims("kv_size", "hidden_size"), True,
              tp="kv"),
    TensorDef("o", "attn_output.weight", "self_attn.o_proj.weight", _dims("hidden_size", "q_size"), True,
              when=_not_opt, tp="row"),
    TensorDef("o", "attn_output.weight", "self_attn.out_proj.weight", _dims("hidden_size", "q_size"), True,
              when=_opt, tp="row"),
    TensorDef("o_bias", "attn_output.bias", "self_attn.out_proj.bias", _hidden, when=_opt, tp="row_bias"),
    TensorDef("mlp_norm", "ffn_norm.weight", "post_attention_layernorm.weight", _hidden, when=_llama_norms),
    TensorDef("mlp_norm", "ffn_norm.weight", "final_layer_norm.weight", _hidden, when=_opt),
    TensorDef("mlp_norm_bias", "ffn_norm.bias", "final_layer_norm.bias", _hidden, when=_opt),
    TensorDef("mlp_norm", "ffn_norm.weight", "pre_feedforward_layernorm.weight", _hidden, when=_gemma),
    TensorDef("attn_post_norm", "post_attention_norm.weight", "post_attention_layernorm.weight", _hidden,
              when=_gemma),
    TensorDef("mlp_post_norm", "post_ffw_norm.weight", "post_feedforward_layernorm.weight", _hidden,
              when=_gemma),
    TensorDef("gate", "ffn_gate.weight", "mlp.gate_proj.weight", _up, True,
              when=_not_opt, mlp="dense", tp="column"),
    TensorDef("up", "ffn_up.weight", "mlp.up_proj.weight", _up, True,
              when=_not_opt, mlp="dense", tp="column"),
    TensorDef("down", "ffn_down.weight", "mlp.down_proj.weight", _down, True,
              when=_not_opt, mlp="dense", tp="row"),
    TensorDef("up", "ffn_up.weight", "fc1.weight", _up, True, when=_opt, tp="column"),
    TensorDef("up_bias", "ffn_up.bias", "fc1.bias", _dims("intermediate_size"), when=_opt, tp="column"),
    TensorDef("down", "ffn_down.weight", "fc2.weight", _down, True, when=_opt, tp="row"),
    TensorDef("down_bias", "ffn_down.bias", "fc2.bias", _hidden, when=_opt, tp="row_bias"),
    TensorDef("router", "ffn_gate_inp.weight", "block_sparse_moe.gate.weight", _router, True,
              when=_mixtral, mlp="moe"),
    TensorDef("router", "ffn_gate_inp.weight", "mlp.gate.weight", _router, True, when=_qwen_moe, mlp="moe"),
    TensorDef("shared_gate", "ffn_gate_shexp.weight", "mlp.shared_expert.gate_proj.weight", _shared_up, True,
              when=_shared_expert, mlp="moe", tp="column"),
    TensorDef("shared_up", "ffn_up_shexp.weight", "mlp.shared_expert.up_proj.weight", _shared_up, True,
              when=_shared_expert, mlp="moe", tp="column"),
    TensorDef("shared_down", "ffn_down_shexp.weight", "mlp.shared_expert.down_proj.weight", _shared_down,
              True, when=_shared_expert, mlp="moe", tp="row"),
    # [1, hidden]: one logit per token, run as a plain product (models/moe.py)
    TensorDef("shared_expert_gate", "ffn_gate_inp_shexp.weight", "mlp.shared_expert_gate.weight",
              lambda s: (1, s.hidden_size), when=_shared_expert, mlp="moe"),
    TensorDef("q_bias", "attn_q.bias", "self_attn.q_proj.bias", _dims("q_size"), when=_qkv_bias, tp="column"),
    TensorDef("k_bias", "attn_k.bias", "self_attn.k_proj.bias", _dims("kv_size"), when=_qkv_bias, tp="kv"),
    TensorDef("v_bias", "attn_v.bias", "self_attn.v_proj.bias", _dims("kv_size"), when=_qkv_bias, tp="kv"),
    TensorDef("q_norm", "attn_q_norm.weight", "self_attn.q_norm.weight", _dims("head_dim"), when=_qk_norm),
    TensorDef("k_norm", "attn_k_norm.weight", "self_attn.k_norm.weight", _dims("head_dim"), when=_qk_norm),
)  # fmt: skip
GLOBAL_TENSORS = (
    TensorDef("embed", "token_embd.weight", "model.embed_tokens.weight", _vocab, True,
              when=_not_opt, tp="vocab"),
    TensorDef("norm", "output_norm.weight", "model.norm.weight", _hidden, when=_not_opt),
    TensorDef("embed", "token_embd.weight", "model.decoder.embed_tokens.weight", _vocab, True,
              when=_opt, tp="vocab"),
    TensorDef("pos_embed", "position_embd.weight", "model.decoder.embed_positions.weight",
              _dims("position_rows", "hidden_size"), when=_opt),
    TensorDef("norm", "output_norm.weight", "model.decoder.final_layer_norm.weight", _hidden,
              when=_opt_final_norm),
    TensorDef("norm_bias", "output_norm.bias", "model.decoder.final_layer_norm.bias", _hidden,
              when=_opt_final_norm),
    TensorDef("project_in", "", "model.decoder.project_in.weight", _dims("hidden_size", "embed_size"), True,
              when=_projected),
    TensorDef("project_out", "", "model.decoder.project_out.weight", _dims("embed_size", "hidden_size"), True,
              when=_projected),
    TensorDef("lm_head", "output.weight", "lm_head.weight", _vocab, True, when=_untied, tp="vocab"),
)  # fmt: skip
# One expert's weights (canonical name after ``layers.N.experts.E.``). Hugging Face stores each
# expert's under its index (``{expert}`` in the name); GGUF stacks all of a layer's experts in one
# [n_expert, rows, cols] tensor (llama.cpp's ``ffn_*_exps``), which the loader splits per expert.
EXPERT_TENSORS = (
    TensorDef("gate", "ffn_gate_exps.weight", "block_sparse_moe.experts.{expert}.w1.weight", _expert_up, True,
              when=_mixtral, tp="column"),
    TensorDef("up", "ffn_up_exps.weight", "block_sparse_moe.experts.{expert}.w3.weight", _expert_up, True,
              when=_mixtral, tp="column"),
    TensorDef("down", "ffn_down_exps.weight", "block_sparse_moe.experts.{expert}.w2.weight", _expert_down,
              True, when=_mixtral, tp="row"),
    TensorDef("gate", "ffn_gate_exps.weight", "mlp.experts.{expert}.gate_proj.weight", _expert_up, True,
              when=_qwen_moe, tp="column"),
    TensorDef("up", "ffn_up_exps.weight", "mlp.experts.{expert}.up_proj.weight", _expert_up, True,
              when=_qwen_moe, tp="column"),
    TensorDef("down", "ffn_down_exps.weight", "mlp.experts.{expert}.down_proj.weight", _expert_down, True,
              when=_qwen_moe, tp="row"),
)  # fmt: skip


# one row per canonical name: rows that share a name differ only in their stored names
TENSOR_BY_NAME = {t.name: t for t in LAYER_TENSORS + GLOBAL_TENSORS}


def expert_name(expert: int, name: str) -> str:
    """The canonical name of expert ``expert``'s weight ``name``, after ``layers.N.``."""
    return f"experts.{expert}.{name}"


def split_experts(w: Any, spec: ModelSpec, where: str) -> list[Any]:
    """One stacked GGUF expert tensor (experts first: a torch tensor, or the raw [n_expert, rows, row
    bytes] blocks of a quantized one, so each expert keeps its stored blocks) as one per expert.
    ``where``: the tensor's name, for the error."""
    if w.shape[0] != spec.num_experts or len(w.shape) != 3:
        raise ModelLoadError(
            f"{where} has shape {tuple(w.shape)}, expected {spec.num_experts} stacked experts"
        )
    return [w[e] for e in range(spec.num_experts)]


def _fused(s: ModelSpec) -> bool:
    return s.family.fused_projections


@dataclass(frozen=True)
class FusedDef:
    """A stored layer tensor (GGUF name after ``blk.N.``, Hugging Face name after ``model.layers.N.``)
    that stacks the canonical ``parts`` along its rows, in order; each part's rows are its shape's first
    dim. Where ``when`` holds, these names mean the fused tensor (Phi-3's ``ffn_up`` is gate and up)."""

    gguf: str
    hf: str
    parts: tuple[str, ...]
    when: Callable[[ModelSpec], bool]

    def row_ranges(self, spec: ModelSpec) -> dict[str, tuple[int, int]]:
        """Canonical part -> its [start, end) rows in the fused tensor."""
        out, start = {}, 0
        for part in self.parts:
            rows = TENSOR_BY_NAME[part].shape(spec)[0]
            out[part] = (start, start + rows)
            start += rows
        return out


# llama.cpp's convert_hf_to_gguf.py (Phi3MiniModel) writes Phi-3's fused weights as they are: gate
# first, as Hugging Face's ``gate_up_proj`` and llama.cpp's swiglu over ``ffn_up`` take it.
FUSED_TENSORS = (
    FusedDef("attn_qkv.weight", "self_attn.qkv_proj.weight", ("q", "k", "v"), when=_fused),
    FusedDef("ffn_up.weight", "mlp.gate_up_proj.weight", ("gate", "up"), when=_fused),
)


def split_fused(fused: FusedDef, spec: ModelSpec, w: Any, where: str) -> dict[str, Any]:
    """The canonical parts of one fused layer tensor ``w`` (a torch tensor or a ``QuantizedTensor``:
    splitting whole rows of blocks is exact). ``where``: the tensor's name, for the error."""
    ranges = fused.row_ranges(spec)
    rows = max(end for _, end in ranges.values())
    if w.shape[0] != rows:
        raise ModelLoadError(f"{where} has {w.shape[0]} rows, expected {rows} ({' + '.join(fused.parts)})")
    if hasattr(w, "map_rows"):
        return {p: w.map_rows(lambda t, a=a, b=b: t[a:b]) for p, (a, b) in ranges.items()}
    return {p: w[a:b] for p, (a, b) in ranges.items()}
