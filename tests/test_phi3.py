"""Phi-3 (``Phi3ForCausalLM``, GGUF "phi3") against transformers on random models (tests/model_factory.py).

The models (``model_factory.PHI3_ARCHS``): plain Phi-3 with GQA and head_dim 24; partial rotary 0.5 with
a tied head; LongRoPE short regime with partial rotary 0.75 (the engine's max_model_len 256 is within
the original context 256, as every reference sequence is); LongRoPE long regime (original context 16,
below every sequence, so transformers runs the long factors throughout as the engine does). Each is
checked from its safetensors folder (fused qkv_proj / gate_up_proj) and from a GGUF converted as
llama.cpp's ``Phi3MiniModel`` writes it (fused attn_qkv / ffn_up, LongRoPE factors as tensors), F32
and Q8_0: top-5 logprobs at every position within 1e-3 and greedy tokens equal to ``generate``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import model_factory as mf
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import test_hf_parity as parity  # noqa: E402  (tests/ is on sys.path; its helpers, not its tests)

from flashdecode.layers.rope import RotaryEmbedding, apply_rope, head_dim_order  # noqa: E402
from flashdecode.models.loader import load_model  # noqa: E402

MAX_TOKENS = 16


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py


def run_parity(path: Path, ref: Any, label: str) -> None:
    prompts = parity.prompts_for(ref.config.vocab_size)
    outs = parity.run_engine(path, prompts, MAX_TOKENS)
    assert len(outs) == len(prompts)
    for k, (out, prompt) in enumerate(zip(outs, prompts)):
        parity.check_request(out, prompt, ref, f"{label} request {k}", max_tokens=MAX_TOKENS)
        got = list(out.outputs[0].token_ids)
        with torch.no_grad():
            want = ref.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=MAX_TOKENS,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        assert got == want, f"{label} request {k}: greedy tokens\nengine {got}\nhf     {want}"


def dequantized_reference(gguf_path: Path, hf_ref: Any) -> Any:
    """The transformers model with the GGUF's weights as gguf-py dequantizes them (fused names map back
    one to one: Phi-3's GGUF keeps Hugging Face's fused qkv and gate_up)."""
    import copy

    import gguf

    tensors = mf.read_gguf_tensors(gguf_path)
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, hf_ref.config.num_hidden_layers)
    ref = copy.deepcopy(hf_ref)
    state = ref.state_dict()
    for name in list(state):
        gguf_name = tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name in tensors:
            state[name] = torch.from_numpy(tensors[gguf_name][1].copy())
    ref.load_state_dict(state)
    return ref.eval()


@pytest.mark.parametrize("arch", mf.PHI3_ARCHS)
def test_hf_folder_matches_transformers(arch: str, hf_model: Callable[..., Path], hf_reference: Any) -> None:
    run_parity(hf_model(arch), hf_reference(arch), f"{arch} hf")


@pytest.mark.parametrize("arch", mf.PHI3_ARCHS)
def test_gguf_f32_matches_transformers(arch: str, gguf_model: Callable[..., Path], hf_reference: Any) -> None:
    run_parity(gguf_model(arch), hf_reference(arch), f"{arch} gguf F32")


@pytest.mark.parametrize("arch", ["phi3", "phi3-longrope"])
def test_gguf_q8_0_matches_transformers_dequantized(
    arch: str, gguf_model: Callable[..., Path], hf_reference: Any
) -> None:
    from flashdecode.layers.quant import QuantizedTensor

    path = gguf_model(arch, "Q8_0")
    weights = load_model(path).weights
    # the fused tensors were split along rows of blocks: every part still runs quantized
    for name in ("q", "k", "v", "gate", "up"):
        assert isinstance(weights[f"layers.0.{name}"], QuantizedTensor), name
        assert weights[f"layers.0.{name}"].format == "Q8_0"
    run_parity(path, dequantized_reference(path, hf_reference(arch)), f"{arch} gguf Q8_0")


def test_specs_from_both_sources_agree(
    hf_model: Callable[..., Path], gguf_model: Callable[..., Path]
) -> None:
    """The GGUF metadata (rope.dimension_count, original context, attn_factor, factor tensors) gives the
    spec the Hugging Face config gives."""
    for arch in mf.PHI3_ARCHS:
        hf, gg = load_model(hf_model(arch)).spec, load_model(gguf_model(arch)).spec
        assert hf.family.name == gg.family.name == "phi3"
        assert hf.rotary_dim == gg.rotary_dim
        cfg = mf.arch_config(arch)
        fraction = cfg.get("partial_rotary_factor", 1.0)
        assert (hf.rotary_dim or hf.head_dim) == int(hf.head_dim * fraction)
        if "rope_scaling" in cfg:
            a, b = hf.rope_scaling, gg.rope_scaling
            assert a is not None and b is not None and a.kind == b.kind == "longrope"
            assert a.short_factors == pytest.approx(b.short_factors)
            assert a.long_factors == pytest.approx(b.long_factors)
            assert (
                a.original_max_position == b.original_max_position == cfg["original_max_position_embeddings"]
            )
            factor = cfg["max_position_embeddings"] / cfg["original_max_position_embeddings"]
            want = math.sqrt(1 + math.log(factor) / math.log(cfg["original_max_position_embeddings"]))
            assert a.attention_factor == pytest.approx(want) and b.attention_factor == pytest.approx(want)
        else:
            assert hf.rope_scaling is None and gg.rope_scaling is None


def test_partial_rotary_permutation_is_hf_rotation() -> None:
    """Permuted rows + full-width rotate-half == transformers' partial rotary, up to the same
    permutation of the output dims."""
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    head_dim, rotary_dim, heads, t = 32, 24, 3, 7
    rope = RotaryEmbedding(head_dim, 64, 10000.0, None, rotary_dim=rotary_dim)
    order = torch.tensor(head_dim_order(head_dim, rotary_dim))
    x = torch.randn(t, heads, head_dim)
    positions = torch.arange(5, 5 + t)
    got = apply_rope(x[..., order], *rope.tables(positions))
    inv = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    emb = torch.cat([torch.outer(positions.float(), inv)] * 2, dim=-1)
    want, _ = apply_rotary_pos_emb(
        x.transpose(0, 1), x.transpose(0, 1), emb.cos(), emb.sin(), unsqueeze_dim=0
    )
    torch.testing.assert_close(got, want.transpose(0, 1)[..., order])


def test_longrope_regime_follows_max_model_len() -> None:
    from flashdecode.layers.rope import RopeScaling

    s = RopeScaling(
        kind="longrope", original_max_position=256, short_factors=(1.0, 2.0), long_factors=(3.0, 4.0)
    )
    assert s.longrope_factors(256) == (1.0, 2.0)
    assert s.longrope_factors(257) == (3.0, 4.0)


def test_info_names_the_family(gguf_model: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    from flashdecode.cli import main

    assert main(["info", "--model", str(gguf_model("phi3-longrope"))]) == 0
    out = capsys.readouterr().out
    assert "phi3" in out and "longrope" in out


def test_fused_tensor_of_the_wrong_size_is_a_load_error(
    hf_model: Callable[..., Path], tmp_path: Path
) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from flashdecode.errors import ModelLoadError

    src = hf_model("phi3")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    weights = load_file(str(bad / "model.safetensors"))
    name = "model.layers.1.self_attn.qkv_proj.weight"
    weights[name] = weights[name][:-1].contiguous()
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="qkv_proj.*rows, expected"):
        load_model(bad)
