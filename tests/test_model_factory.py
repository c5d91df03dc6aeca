"""The reference-model factory, checked against transformers alone (no flashdecode).

If these pass, a parity failure in tests/test_hf_parity.py is the engine's, not the oracle's:
the HF folders load in transformers with the intended shapes and fully random weights, and the
GGUF files decode (in transformers' own GGUF loader, or gguf-py's reader) to the same model.
"""

from __future__ import annotations

import json

import model_factory as mf
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

T = gguf.GGMLQuantizationType
PROMPT = [(7 * i + 3) % 480 for i in range(40)]


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py


def _logits(model, ids=PROMPT):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _load_gguf(path, config=None):
    kwargs = {"config": config} if config is not None else {}
    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, **kwargs
    ).eval()


# ---------------------------------------------------------------------------------------------
# the HF folders


@pytest.mark.parametrize("arch", mf.ARCHS)
def test_hf_model_is_random_and_well_conditioned(arch, hf_model, hf_reference):
    path = hf_model(arch)
    model = hf_reference(arch)
    cfg = model.config
    expected = mf.arch_config(arch)
    for key in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "max_position_embeddings",
        "tie_word_embeddings",
    ):
        assert getattr(cfg, key) == expected[key], key
    assert model.dtype == torch.float32
    assert json.loads((path / "config.json").read_text())["dtype"] == "float32"

    # every parameter random: no norm left at ones, no bias at zeros
    state = model.state_dict()
    norms = [k for k in state if "norm" in k]
    assert norms and all(not torch.allclose(state[k], torch.ones_like(state[k])) for k in norms)
    biases = [k for k in state if k.endswith(".bias")]
    if arch == "qwen2":
        assert len(biases) == 3 * cfg.num_hidden_layers
        assert all(state[k].abs().mean() > 0.05 for k in biases)
    else:
        assert biases == []
    if arch == "qwen3":
        assert any("q_norm" in k for k in norms) and any("k_norm" in k for k in norms)
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)

    # logits spread a few nats: top-1 neither certain nor uniform, top-5 distinguishable
    logp = _logits(model).log_softmax(-1)
    top = logp.topk(6, dim=-1).values
    assert -3.5 < top[:, 0].mean() < -0.3
    assert (top[:, 0] - top[:, 4]).min() > 0.05
    assert 1.0 < _logits(model).std() < 5.0


def test_same_seed_same_model_other_seed_other_model(hf_model, hf_reference, tmp_path):
    other = AutoModelForCausalLM.from_pretrained(
        mf.make_hf_model("llama", tmp_path / "s1", seed=1), dtype=torch.float32
    ).eval()
    again = AutoModelForCausalLM.from_pretrained(
        mf.make_hf_model("llama", tmp_path / "s0", seed=0), dtype=torch.float32
    ).eval()
    ref = _logits(hf_reference("llama"))
    assert torch.equal(_logits(again), ref)
    assert not torch.allclose(_logits(other), ref)


@pytest.mark.parametrize("arch", mf.ARCHS)
def test_tokenizer_files(arch, hf_model):
    path = hf_model(arch)
    cfg = AutoConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == cfg.vocab_size
    ids = {t: tok.convert_tokens_to_ids(t) for t in mf.SPECIAL_TOKENS}
    assert sorted(ids.values()) == list(range(cfg.vocab_size - 4, cfg.vocab_size))
    text = "The engine reads 12345 tokens, naïvely! 你好"
    enc = tok(text)["input_ids"]
    assert tok.decode(enc, skip_special_tokens=True) == text
    uses_bos = arch.startswith("llama") or arch == "mistral"
    assert (enc[0] == ids[mf.BOS]) == uses_bos
    assert (cfg.bos_token_id == ids[mf.BOS]) if uses_bos else cfg.bos_token_id is None
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    gen = json.loads((path / "generation_config.json").read_text())
    gen_eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert gen_eos[0] == cfg.eos_token_id and set(gen_eos) <= set(ids.values())
    assert len(gen_eos) == (1 if arch in ("llama", "mistral") else 2)


def test_sharded_save_is_the_same_model(hf_model, hf_reference):
    path = hf_model("llama", shards=True)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    sharded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert torch.equal(_logits(sharded), _logits(hf_reference("llama")))


# ---------------------------------------------------------------------------------------------
# GGUF, F32: transformers' GGUF loader must rebuild the identical model


@pytest.mark.parametrize("arch", mf.ARCHS)
def test_gguf_f32_loads_in_transformers_identically(arch, hf_model, gguf_model, hf_reference):
    path = gguf_model(arch)
    config = None
    if arch == "llama3":
        # transformers' GGUF loader ignores rope_freqs.weight (Llama-3 RoPE scaling), so it would build
        # an unscaled model; load the GGUF's weights into the HF config instead. The rope_freqs tensor
        # itself is checked in test_gguf_llama3_rope_freqs.
        config = AutoConfig.from_pretrained(hf_model(arch))
    if arch == "qwen3":
        # transformers maps no head_dim for qwen3 GGUFs (it ignores attention.key_length) and falls back
        # to Qwen3Config's 128; ours is 32. Same workaround; the key_length metadata is checked below.
        config = AutoConfig.from_pretrained(hf_model(arch))
    model = _load_gguf(path, config)
    ref = hf_reference(arch)
    if arch in ("llama", "mistral", "qwen2"):
        for key in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "vocab_size",
            "tie_word_embeddings",
            "rms_norm_eps",
        ):
            assert getattr(model.config, key) == pytest.approx(getattr(ref.config, key)), key
    # exact: F32 stores the weights bit for bit, and the Q/K un-permutation is a pure reordering
    assert torch.equal(_logits(model), _logits(ref))


@pytest.mark.parametrize("arch", mf.ARCHS)
def test_gguf_metadata_as_llama_cpp_writes_it(arch, hf_model, gguf_model):
    cfg = mf.arch_config(arch)
    meta = mf.read_gguf_metadata(gguf_model(arch))
    name = {"llama": "llama", "llama3": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[arch]
    assert meta["general.architecture"] == name
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    expect = {
        "block_count": cfg["num_hidden_layers"],
        "context_length": 512,
        "embedding_length": cfg["hidden_size"],
        "feed_forward_length": cfg["intermediate_size"],
        "attention.head_count": cfg["num_attention_heads"],
        "attention.head_count_kv": cfg["num_key_value_heads"],
        "rope.freq_base": cfg["rope_theta"],
    }
    if name == "llama":  # LlamaModel.set_gguf_parameters adds these two
        expect.update({"vocab_size": cfg["vocab_size"], "rope.dimension_count": head_dim})
    else:
        assert f"{name}.vocab_size" not in meta and f"{name}.rope.dimension_count" not in meta
    if "head_dim" in cfg:
        expect.update({"attention.key_length": head_dim, "attention.value_length": head_dim})
    for key, value in expect.items():
        assert meta[f"{name}.{key}"] == pytest.approx(value), key
    assert meta[f"{name}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"], rel=1e-6)
    assert f"{name}.rope.scaling.type" not in meta  # llama3 scaling is the rope_freqs tensor, not metadata
    assert meta["general.file_type"] == gguf.LlamaFileType.ALL_F32

    tensors = mf.read_gguf_tensors(gguf_model(arch))
    assert ("output.weight" in tensors) == (not cfg["tie_word_embeddings"])
    assert ("rope_freqs.weight" in tensors) == (arch == "llama3")
    per_layer = {
        "attn_norm",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_norm",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    }
    if arch == "qwen2":
        assert {f"blk.0.attn_{x}.bias" for x in "qkv"} <= set(tensors)
    if arch == "qwen3":
        per_layer |= {"attn_q_norm", "attn_k_norm"}
    for i in range(cfg["num_hidden_layers"]):
        assert {f"blk.{i}.{n}.weight" for n in per_layer} <= set(tensors)
    assert {"token_embd.weight", "output_norm.weight"} <= set(tensors)
    assert all(t == "F32" for t, _ in tensors.values())


@pytest.mark.parametrize("arch", mf.ARCHS)
def test_gguf_weights_unpermute_to_hf(arch, gguf_model, hf_reference):
    """Reading back with gguf-py alone: Q/K rows permuted for the "llama" architecture only."""
    ref = hf_reference(arch).state_dict()
    cfg = hf_reference(arch).config
    tensors = mf.read_gguf_tensors(gguf_model(arch))
    permuted = arch in ("llama", "llama3", "mistral")
    for i in range(cfg.num_hidden_layers):
        for gname, hname, heads in (
            ("attn_q", "q_proj", cfg.num_attention_heads),
            ("attn_k", "k_proj", cfg.num_key_value_heads),
        ):
            for suffix in ("weight", "bias"):
                key = f"blk.{i}.{gname}.{suffix}"
                if key not in tensors:
                    continue
                stored = tensors[key][1]
                hf = ref[f"model.layers.{i}.self_attn.{hname}.{suffix}"].numpy()
                back = mf.unpermute(stored, heads) if permuted else stored
                np.testing.assert_array_equal(back, hf)
                assert np.array_equal(stored, hf) != permuted or cfg.head_dim == 2
        if arch == "qwen3":
            np.testing.assert_array_equal(
                tensors[f"blk.{i}.attn_q_norm.weight"][1],
                ref[f"model.layers.{i}.self_attn.q_norm.weight"].numpy(),
            )


def test_permute_matches_llama_cpp_formula():
    w = np.arange(6 * 16 * 3).reshape(6 * 16, 3)  # 6 heads of 16 rows
    p = mf.permute(w, 6, 6)
    # head 0 rows become the interleave of its halves: 0, 8, 1, 9, ...
    assert list(p[:16, 0] // 3) == [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15]
    np.testing.assert_array_equal(mf.unpermute(p, 6), w)
    k = np.arange(2 * 16 * 3).reshape(32, 3)
    np.testing.assert_array_equal(mf.permute(k, 6, 2), mf.permute(k, 2))  # n_head_kv wins


def test_gguf_llama3_rope_freqs(gguf_model, hf_reference):
    """rope_freqs.weight holds per-frequency divisors: base_inv_freq / factors == HF's scaled inv_freq."""
    model = hf_reference("llama3")
    cfg = model.config
    factors = mf.read_gguf_tensors(gguf_model("llama3"))["rope_freqs.weight"][1]
    assert factors.shape == (cfg.head_dim // 2,)
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", None))
    base = 1.0 / (theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / cfg.head_dim))
    hf_inv_freq = model.model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(base / factors, hf_inv_freq, rtol=1e-6)
    # and the scaling is not a no-op here: some frequencies unscaled, some divided by 8, some between
    assert (
        factors.min() == 1.0 and factors.max() == pytest.approx(8.0) and ((factors > 1) & (factors < 8)).any()
    )


@pytest.mark.parametrize("arch", ["llama3", "qwen2"])
def test_gguf_tokenizer_metadata(arch, hf_model, gguf_model):
    path = hf_model(arch)
    meta = mf.read_gguf_metadata(gguf_model(arch))
    tok_json = json.loads((path / "tokenizer.json").read_text())
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(path)
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == ("llama-bpe" if arch == "llama3" else "qwen2")
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == len(tok) and tokens == tok.convert_ids_to_tokens(list(range(len(tok))))
    types = meta["tokenizer.ggml.token_type"]
    specials = {tok.convert_tokens_to_ids(t) for t in mf.SPECIAL_TOKENS}
    assert {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL} == specials
    assert all(t == gguf.TokenType.NORMAL for i, t in enumerate(types) if i not in specials)
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in tok_json["model"]["merges"]]
    assert meta["tokenizer.ggml.eos_token_id"] == tok.convert_tokens_to_ids(tok_cfg["eos_token"])
    if arch == "llama3":
        assert meta["tokenizer.ggml.bos_token_id"] == tok.convert_tokens_to_ids(mf.BOS)
        assert meta["tokenizer.ggml.add_bos_token"] is True
    else:
        assert "tokenizer.ggml.bos_token_id" not in meta
        assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == mf.CHATML_TEMPLATE


# ---------------------------------------------------------------------------------------------
# quantized GGUF


# per type: (relative RMS error bound of the stored weights, llama.cpp's file type)
QUANT_TYPES = {
    "F16": (1e-3, "MOSTLY_F16"),
    "BF16": (5e-3, "MOSTLY_BF16"),
    "Q8_0": (1e-2, "MOSTLY_Q8_0"),
    "Q4_0": (0.15, "MOSTLY_Q4_0"),
    "Q4_1": (0.12, "MOSTLY_Q4_1"),
    "Q4_K": (0.1, "MOSTLY_Q4_K_S"),
    "Q6_K": (0.03, "MOSTLY_Q6_K"),
    "Q2_K": (0.4, "MOSTLY_Q2_K"),
}


@pytest.mark.parametrize("tensor_type", sorted(QUANT_TYPES))
def test_quantized_gguf_types_and_values(tensor_type, gguf_model, hf_reference):
    kwargs = mf.KQUANT_OVERRIDES if tensor_type.endswith("_K") else {}
    path = gguf_model("llama", tensor_type, **kwargs)
    ref = hf_reference("llama", **kwargs)
    tol, ftype = QUANT_TYPES[tensor_type]
    assert mf.read_gguf_metadata(path)["general.file_type"] == gguf.LlamaFileType[ftype]
    tensors = mf.read_gguf_tensors(path)
    ref_state = ref.state_dict()
    for name, (qtype, value) in tensors.items():
        if value.ndim == 1 or name.endswith("_norm.weight"):
            assert qtype == "F32", name  # llama.cpp keeps 1-D tensors and norms in F32
            continue
        assert qtype == tensor_type, name
        hf_name = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}.get(
            name
        )
        if hf_name is None:
            blk, i, rest = name.split(".", 2)
            hf_name = next(
                k for k in ref_state if k.startswith(f"model.layers.{i}.") and k.endswith(_HF_SUFFIX[rest])
            )
        hf = ref_state[hf_name].numpy()
        if "attn_q" in name or "attn_k" in name:
            heads = ref.config.num_attention_heads if "attn_q" in name else ref.config.num_key_value_heads
            value = mf.unpermute(value, heads)
        rel = np.sqrt(((value - hf) ** 2).mean() / (hf**2).mean())
        assert rel < tol, (name, rel)


_HF_SUFFIX = {
    "attn_q.weight": "q_proj.weight",
    "attn_k.weight": "k_proj.weight",
    "attn_v.weight": "v_proj.weight",
    "attn_output.weight": "o_proj.weight",
    "ffn_gate.weight": "gate_proj.weight",
    "ffn_up.weight": "up_proj.weight",
    "ffn_down.weight": "down_proj.weight",
}


def test_quantization_falls_back_to_f16_like_llama_cpp(tmp_path, hf_model):
    """A row length that is not a multiple of the block size: llama.cpp writes F16 instead."""
    path = mf.hf_to_gguf(hf_model("llama"), tmp_path / "k.gguf", "Q4_K")  # rows of 96, 288: not /256
    types = {t for name, (t, v) in mf.read_gguf_tensors(path).items() if v.ndim == 2}
    assert types == {"F16"}


@pytest.mark.parametrize("tensor_type", ["Q8_0", "Q4_K"])
def test_quantized_gguf_loads_in_transformers(tensor_type, gguf_model, hf_reference):
    """transformers dequantizes the file with gguf-py, as the engine's reference for quantized parity."""
    kwargs = mf.KQUANT_OVERRIDES if tensor_type.endswith("_K") else {}
    model = _load_gguf(gguf_model("llama", tensor_type, **kwargs))
    ref = hf_reference("llama", **kwargs)
    # same weights as the dequantized file, bit for bit
    tensors = mf.read_gguf_tensors(gguf_model("llama", tensor_type, **kwargs))
    q = mf.unpermute(tensors["blk.1.attn_q.weight"][1], ref.config.num_attention_heads)
    np.testing.assert_array_equal(model.model.layers[1].self_attn.q_proj.weight.detach().numpy(), q)
    # and near the original model (a random model has no redundancy: 4 bits move its logits a lot;
    # measured mean |d logprob| 0.045 for Q8_0, 1.0 for Q4_K)
    got, want = _logits(model).log_softmax(-1), _logits(ref).log_softmax(-1)
    assert (got - want).abs().mean() < (0.1 if tensor_type == "Q8_0" else 2.0)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > (0.9 if tensor_type == "Q8_0" else 0.3)


# per K-quant: bytes per 256 values, values per sub-block, levels per sub-block, relative RMS bound
KQUANT_ENCODINGS = {"Q4_K": (144, 32, 15, 0.1), "Q6_K": (210, 16, 63, 0.03), "Q2_K": (84, 16, 3, 0.4)}


@pytest.mark.parametrize("qtype", sorted(KQUANT_ENCODINGS))
@pytest.mark.parametrize("case", ["normal", "zeros", "constant", "negative", "positive", "outlier"])
def test_kquant_encoders_round_trip_through_gguf_py(qtype, case):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 512)).astype(np.float32)
    if case == "zeros":
        x[:] = 0
    elif case == "constant":
        x[:] = 0.3
    elif case == "negative":
        x = -np.abs(x)
    elif case == "positive":
        x = np.abs(x) + 1
    elif case == "outlier":
        x[0, 5] = 50.0
    size, sub, levels, bound = KQUANT_ENCODINGS[qtype]
    q = mf.quantize(x, T[qtype])
    assert q.dtype == np.uint8 and q.shape == (4, 512 // 256 * size)
    back = gguf.quants.dequantize(q, T[qtype]).reshape(x.shape)
    err = np.abs(back - x)
    # per 16/32-value sub-block: error within a fraction of that sub-block's range
    span = np.ptp(x.reshape(-1, sub), axis=1, keepdims=True) + np.abs(x.reshape(-1, sub)).max(
        1, keepdims=True
    )
    assert (err.reshape(-1, sub) <= span / levels + 2e-3 * np.abs(x).max() + 1e-6).mean() > 0.99
    if case in ("zeros", "constant"):
        np.testing.assert_allclose(back, x, atol=1e-3)
    rms = np.sqrt((err**2).mean() / max((x**2).mean(), 1e-12))
    assert rms < bound * (3 if case == "outlier" else 1)
