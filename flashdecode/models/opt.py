"""OPT (``OPTForCausalLM``): what its checkpoints say that the other families' do not.

The one decoder runs OPT from data on the spec (models/spec.py): LayerNorm with biases, learned
positions (row p + 2 of the position table) added to the embeddings in place of RoPE, a plain
fc1 -> ReLU -> fc2 MLP, biases on every projection, norms before attention and the MLP or, with
``do_layer_norm_before`` off (OPT-350m), after each residual add (then no final norm), and the
project_in / project_out pair where ``word_embed_proj_dim`` differs from the hidden size. llama.cpp
has no OPT architecture, so OPT loads from Hugging Face folders only.
"""

from __future__ import annotations

from typing import Any

from ..errors import ModelLoadError

POSITION_OFFSET = 2  # position p reads row p + 2 of the table (transformers' OPTLearnedPositionalEmbedding)
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which transformers' OPT uses


def hf_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config under the names the shared reader takes (``intermediate_size`` for ``ffn_dim``, the
    LayerNorm eps), after checking what the decoder does not run."""
    unsupported = {
        "activation_function": (config.get("activation_function", "relu"), "relu"),
        "enable_bias": (config.get("enable_bias", True), True),
        "layer_norm_elementwise_affine": (config.get("layer_norm_elementwise_affine", True), True),
        "_remove_final_layer_norm": (config.get("_remove_final_layer_norm", False), False),
    }
    for key, (got, want) in unsupported.items():
        if got != want:
            raise ModelLoadError(f"unsupported OPT config {key}={got!r} (supported: {want!r})")
    return {
        **config,
        "intermediate_size": config["ffn_dim"],
        "rms_norm_eps": LAYER_NORM_EPS,
        "tie_word_embeddings": config.get("tie_word_embeddings", True),
    }


def hf_fields(config: dict[str, Any]) -> dict[str, Any]:
    """``ModelSpec`` fields from an OPT config.json."""
    hidden = int(config["hidden_size"])
    embed = int(config.get("word_embed_proj_dim") or hidden)
    return dict(
        hidden_act="relu",
        norm_before=bool(config.get("do_layer_norm_before", True)),
        embed_dim=None if embed == hidden else embed,
    )
