"""Gemma 2 and Gemma 3 text (``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM``, GGUF "gemma2" / "gemma3")
against transformers on random models (tests/model_factory.py), and the attention features they need.

The models (``model_factory.GEMMA_ARCHS``): Gemma 2 with head_dim 48, GQA 4:2, sliding window 8 on
every other layer and soft-caps low enough to bind; Gemma 3 with head_dim 40, GQA 6:2, five sliding
layers (window 8, local RoPE base) and a global one with linearly scaled RoPE, and an untied head.
Every prompt (23 to 40 tokens) is longer than the window. Each is checked from its safetensors folder
and from a GGUF converted as llama.cpp writes it (norms as 1 + w): top-5 logprobs at every position
within 1e-3 and 32 greedy tokens equal to ``generate``. The features are shown to matter: transformers
with the caps, the window or the attention scale changed gives other logits.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

# the Triton kernels run under the interpreter on CPU tensors (test_triton_policy_...); set before
# triton is first imported, as tests/test_attention_triton.py does
os.environ["TRITON_INTERPRET"] = "1"

import model_factory as mf  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import test_attention as attention_helpers  # noqa: E402  (tests/ is on sys.path; its helpers)
import test_hf_parity as parity  # noqa: E402

from flashdecode.errors import UnsupportedArchitectureError  # noqa: E402
from flashdecode.layers.attention import SoftmaxPolicy, paged_attention  # noqa: E402
from flashdecode.models.loader import load_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py


def check_outputs(outs: list[Any], prompts: list[list[int]], ref: Any, label: str) -> None:
    assert len(outs) == len(prompts)
    for k, (out, prompt) in enumerate(zip(outs, prompts)):
        parity.check_request(out, prompt, ref, f"{label} request {k}")
        parity.check_greedy(out, prompt, ref, f"{label} request {k}")


def run_parity(path: Path, ref: Any, label: str) -> None:
    prompts = parity.prompts_for(ref.config.vocab_size)
    assert min(len(p) for p in prompts) > ref.config.sliding_window  # the window binds
    check_outputs(parity.run_engine(path, prompts), prompts, ref, label)


@pytest.mark.parametrize("arch", mf.GEMMA_ARCHS)
def test_hf_folder_matches_transformers(arch: str, hf_model: Callable[..., Path], hf_reference: Any) -> None:
    run_parity(hf_model(arch), hf_reference(arch), f"{arch} hf")


@pytest.mark.parametrize("arch", mf.GEMMA_ARCHS)
def test_gguf_f32_matches_transformers(arch: str, gguf_model: Callable[..., Path], hf_reference: Any) -> None:
    run_parity(gguf_model(arch), hf_reference(arch), f"{arch} gguf F32")


def test_query_pre_attn_scalar_other_than_head_dim(hf_model: Callable[..., Path], hf_reference: Any) -> None:
    """scale = query_pre_attn_scalar ** -0.5 (Gemma 2 27B's 144 with head_dim 128): from Hugging Face
    folders; GGUF cannot carry it, so the converter refuses the model."""
    path, ref = hf_model("gemma3", query_pre_attn_scalar=64), hf_reference("gemma3", query_pre_attn_scalar=64)
    assert load_model(path).spec.attention_scale == pytest.approx(64**-0.5)
    run_parity(path, ref, "gemma3 query_pre_attn_scalar=64 hf")
    with pytest.raises(NotImplementedError, match="query_pre_attn_scalar"):
        mf.hf_to_gguf(path, path.parent / "scalar.gguf")


@torch.no_grad()
def _logits(model: Any, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0]


def test_features_change_the_reference(hf_model: Callable[..., Path], hf_reference: Any) -> None:
    """Each Gemma feature moves transformers' logits well beyond the parity tolerance, so the parity
    tests above fail where the engine ignores one: both soft-caps, the sliding window, the attention
    scale."""
    from transformers import AutoModelForCausalLM

    ids = parity.prompts_for(512)[0]
    ref2, ref3 = hf_reference("gemma2"), hf_reference("gemma3")
    base2, base3 = _logits(ref2, ids), _logits(ref3, ids)

    uncapped = copy.deepcopy(ref2)
    uncapped.config.final_logit_softcapping = None
    assert (_logits(uncapped, ids) - base2).abs().max() > 0.1
    for layer in uncapped.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    uncapped.config.final_logit_softcapping = ref2.config.final_logit_softcapping
    assert (_logits(uncapped, ids) - base2).abs().max() > 0.1

    for arch, base in (("gemma2", base2), ("gemma3", base3)):
        wide = AutoModelForCausalLM.from_pretrained(hf_model(arch), sliding_window=4096, dtype=torch.float32)
        assert (_logits(wide.eval(), ids) - base).abs().max() > 0.1, arch

    scaled = hf_reference("gemma3", query_pre_attn_scalar=64)
    assert (_logits(scaled, ids) - base3).abs().max() > 0.1


def test_unified_softmax_with_soft_cap(hf_model: Callable[..., Path], hf_reference: Any) -> None:
    """FlashDecoding++'s unified max on Gemma 2, phi = 80 for every layer: capped scores lie within
    +-2, so the cap is the unified max (80 itself would leave the fp32 window on every row) and no row
    falls back; the results match transformers as the exact path does."""
    path, ref = hf_model("gemma2"), hf_reference("gemma2")
    prompts = parity.prompts_for(ref.config.vocab_size)
    llm = parity.make_llm(path, softmax="unified", enable_prefix_caching=False)
    llm.engine.model.softmax = SoftmaxPolicy("unified", phi=80.0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], parity.sampling_params())
    check_outputs(outs, prompts, ref, "gemma2 unified")
    stats = llm.engine.stats()
    tokens = sum(len(p) for p in prompts) + len(prompts) * (parity.MAX_TOKENS - 1)
    assert (
        stats.attention_rows_checked == tokens * ref.config.num_attention_heads * ref.config.num_hidden_layers
    )
    assert stats.attention_fallbacks == 0


def test_specs_from_both_sources_agree(
    hf_model: Callable[..., Path], gguf_model: Callable[..., Path]
) -> None:
    for arch in mf.GEMMA_ARCHS:
        cfg = mf.arch_config(arch)
        hf, gg = load_model(hf_model(arch)).spec, load_model(gguf_model(arch)).spec
        for name in (
            "hidden_act",
            "attn_logit_softcap",
            "final_logit_softcap",
            "sliding_window",
            "layer_types",
            "rope_theta",
            "rope_local_theta",
            "rope_scaling",
            "tie_embeddings",
        ):
            assert getattr(hf, name) == getattr(gg, name), (arch, name)
        assert (
            hf.attention_scale == pytest.approx(gg.attention_scale) == pytest.approx(cfg["head_dim"] ** -0.5)
        )
        assert hf.family.name == gg.family.name == arch
        assert hf.sliding_window == cfg["sliding_window"] and hf.hidden_act == "gelu_tanh"
        assert hf.native_block
    g2, g3 = load_model(hf_model("gemma2")).spec, load_model(hf_model("gemma3")).spec
    assert g2.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert g2.attn_logit_softcap == 2.0 and g2.final_logit_softcap == 4.0 and g2.rope_local_theta is None
    assert g3.layer_types == ("sliding_attention",) * 5 + ("full_attention",)
    assert g3.attn_logit_softcap is None and g3.final_logit_softcap is None
    assert g3.rope_theta == 1e6 and g3.rope_local_theta == 1e4
    assert g3.rope_scaling is not None and (g3.rope_scaling.kind, g3.rope_scaling.factor) == ("linear", 4.0)


def test_norm_weights_are_one_plus_w(hf_model: Callable[..., Path], gguf_model: Callable[..., Path]) -> None:
    """The loaders hand the decoder 1 + w: Hugging Face stores w, the GGUF file 1 + w."""
    from safetensors.torch import load_file

    path = hf_model("gemma3")
    raw = load_file(str(path / "model.safetensors"))
    hf, gg = load_model(path).weights, load_model(gguf_model("gemma3")).weights
    for canonical, stored in (
        ("layers.1.mlp_norm", "model.layers.1.pre_feedforward_layernorm.weight"),
        ("layers.1.attn_post_norm", "model.layers.1.post_attention_layernorm.weight"),
        ("layers.1.mlp_post_norm", "model.layers.1.post_feedforward_layernorm.weight"),
        ("layers.1.q_norm", "model.layers.1.self_attn.q_norm.weight"),
        ("norm", "model.norm.weight"),
    ):
        torch.testing.assert_close(hf[canonical], raw[stored] + 1.0, rtol=0, atol=0)
        torch.testing.assert_close(gg[canonical], raw[stored] + 1.0, rtol=0, atol=0)


def test_info_names_the_family(gguf_model: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    from flashdecode.cli import main

    assert main(["info", "--model", str(gguf_model("gemma2"))]) == 0
    out = capsys.readouterr().out
    assert "gemma2" in out and "attention soft-cap 2" in out and "final soft-cap 4" in out
    assert "sliding window 8 on 2/3 layers" in out and "GeGLU" in out


def test_multimodal_gemma3_is_a_clear_error(hf_model: Callable[..., Path], tmp_path: Path) -> None:
    bad = tmp_path / "gemma3-vision"
    shutil.copytree(hf_model("gemma3"), bad)
    config = json.loads((bad / "config.json").read_text())
    config |= {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="Gemma3ForConditionalGeneration.*supported"):
        load_model(bad)


# --- attention: soft-cap and sliding window against a float64 reference ---------------------------


def reference_attention(q, cache, layer, meta, scale, soft_cap, window) -> torch.Tensor:
    """Every token's attention computed alone in float64 from the cache's keys and values: scaled
    scores, cap * tanh(s / cap), keys in (p - window, p], softmax."""
    rows = []  # (flattened token, its key slots, its position)
    for i in range(meta.num_decode):
        n = int(meta.decode_context_lens[i])
        rows.append((i, meta.decode_slots[i, :n], n - 1))
    for seg in meta.prefills:
        for j in range(seg.num_query):
            rows.append((seg.start + j, seg.slots, seg.context_len - seg.num_query + j))
    out = torch.empty(q.shape, dtype=torch.float64)
    h = q.shape[1]
    for token, slots, pos in rows:
        k, v = (t.double() for t in cache.gather(layer, slots, torch.float32))
        g = h // k.shape[1]
        s = torch.einsum("hd,lhd->hl", q[token].double(), k.repeat_interleave(g, 1)) * scale
        if soft_cap is not None:
            s = soft_cap * torch.tanh(s / soft_cap)
        keys = torch.arange(k.shape[0])
        s[:, (keys > pos) | ((keys <= pos - window) if window else False)] = -math.inf
        out[token] = torch.einsum("hl,lhd->hd", s.softmax(-1), v.repeat_interleave(g, 1))
    return out


@pytest.mark.parametrize("soft_cap, window", [(1.5, None), (None, 5), (2.0, 4), (3.0, 30)])
def test_paged_attention_soft_cap_and_window(soft_cap: float | None, window: int | None) -> None:
    """Two decodes and two prefill chunks (one over a cached prefix) of test_attention's paged step,
    with logits scaled up so the cap binds: exact and unified (both windows, a phi far above the cap)
    equal the float64 reference; the window at 30 is wider than every sequence."""
    q, cache, meta = attention_helpers.paged_step()
    q = q * 4.0
    scale = 0.25
    for layer in range(2):
        want = reference_attention(q, cache, layer, meta, scale, soft_cap, window)
        unwindowed = reference_attention(q, cache, layer, meta, scale, soft_cap, None)
        if window is not None and window < 13:
            assert (want - unwindowed).abs().max() > 1e-2  # the band hides keys somewhere
        got = paged_attention(q, cache, layer, meta, scale, None, soft_cap, window)
        assert (got.double() - want).abs().max() < 1e-5
        for phi, fallbacks in ((0.0, False), (70.0, soft_cap is None)):
            policy = SoftmaxPolicy("unified", phi=phi, backend="torch")
            got = paged_attention(q, cache, layer, meta, scale, policy, soft_cap, window)
            assert (got.double() - want).abs().max() < 1e-5
            # a capped layer's unified max is min(phi, cap): no row leaves the window
            assert policy.rows_checked == 16 * 6 and (policy.fallbacks > 0) == fallbacks


@pytest.mark.parametrize("soft_cap, window", [(None, 5), (2.0, 4)])
def test_triton_policy_soft_cap_and_window(
    soft_cap: float | None, window: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the Triton kernels chosen (under the interpreter): windowed decode rows run the decode
    kernel on their cut rows, while capped layers and windowed prefills, which the kernels do not
    implement, run the torch paths; every result equals the float64 reference."""
    pytest.importorskip("triton")
    from flashdecode.kernels.triton import attention as kernels

    calls = {"decode": 0, "prefill": 0}

    def counted(name: str, kernel: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return kernel(*args, **kwargs)

        return run

    monkeypatch.setattr(
        kernels, "decode_attention_triton", counted("decode", kernels.decode_attention_triton)
    )
    monkeypatch.setattr(
        kernels, "prefill_attention_triton", counted("prefill", kernels.prefill_attention_triton)
    )
    q, cache, meta = attention_helpers.paged_step()
    q = q * 4.0
    for layer in range(2):
        want = reference_attention(q, cache, layer, meta, 0.25, soft_cap, window)
        policy = SoftmaxPolicy("unified", phi=0.0, backend="triton")
        got = paged_attention(q, cache, layer, meta, 0.25, policy, soft_cap, window)
        assert (got.double() - want).abs().max() < 1e-5
    assert calls == {"decode": 2 if soft_cap is None else 0, "prefill": 0}


@pytest.mark.parametrize("window", [1, 7, 20, None])
def test_unified_prefill_blocks_skip_what_the_band_hides(window: int | None) -> None:
    """Small query and key blocks, so that whole key blocks fall outside every query's band and are
    skipped, and band edges cross blocks: the unified chunked prefill equals the exact one."""
    from flashdecode.layers.attention import prefill_attention_exact, prefill_attention_unified

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(*shape, generator=g) for shape in ((37, 4, 16), (50, 2, 16), (50, 2, 16)))
    want = prefill_attention_exact(q, k, v, 0.5, 3.0, window)
    got, fallback = prefill_attention_unified(
        q, k, v, 0.5, 3.0, block_q=4, block_k=8, soft_cap=3.0, sliding_window=window
    )
    assert not bool(fallback.any())
    assert (got - want).abs().max() < 1e-5


def test_soft_cap_is_transformers_softcap() -> None:
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    from flashdecode.layers.attention import prefill_attention_exact

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(9, n, 8, generator=g) * 3 for n in (4, 2, 2))
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = 2, False
    mask = torch.full((9, 9), -math.inf).triu(1)
    pos = torch.arange(9)
    mask[pos[None, :] <= pos[:, None] - 4] = -math.inf  # window 4
    want, _ = eager_attention_forward(
        module,
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        mask[None, None],
        scaling=0.5,
        softcap=2.5,
    )
    got = prefill_attention_exact(q, k, v, 0.5, soft_cap=2.5, sliding_window=4)
    torch.testing.assert_close(got, want[0], rtol=1e-5, atol=1e-6)


def test_chunked_prefill_and_prefix_hits(hf_model: Callable[..., Path], hf_reference: Any) -> None:
    """Prompts prefilled in chunks of 16 tokens (chunks whose window starts inside the cached part),
    then again over the prefix cache's blocks (no prompt logprobs: those disable the lookup): both runs
    still match transformers."""
    from flashdecode import SamplingParams

    path, ref = hf_model("gemma3"), hf_reference("gemma3")
    prompts = parity.prompts_for(ref.config.vocab_size, seed=1)
    llm = parity.make_llm(path, max_num_batched_tokens=16, max_num_seqs=1)
    requests = [{"prompt_token_ids": p} for p in prompts]
    check_outputs(llm.generate(requests, parity.sampling_params()), prompts, ref, "gemma3 chunked")
    params = SamplingParams(temperature=0, max_tokens=parity.MAX_TOKENS, logprobs=parity.TOP, ignore_eos=True)
    for k, (out, prompt) in enumerate(zip(llm.generate(requests, params), prompts)):
        parity.check_request(out, prompt, ref, f"gemma3 prefix hits request {k}", prompt_logprobs=False)
    assert llm.engine.stats().prefix_cache_hits > 0


def test_configs_without_the_new_fields_read_as_transformers_reads_them() -> None:
    """Hub configs older than transformers 5 (Gemma 3's rope_theta / rope_local_base_freq /
    rope_scaling / sliding_window_pattern; Gemma 2 without layer_types or soft-caps): the spec follows
    what transformers' own config classes make of them."""
    import transformers

    from flashdecode.models.safetensors_loader import spec_from_hf_config

    shape = dict(vocab_size=512, hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=16)
    old3 = dict(
        shape,
        num_hidden_layers=8,
        intermediate_size=144,
        rope_theta=500000.0,
        rope_local_base_freq=20000.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        sliding_window=16,
        sliding_window_pattern=4,
        query_pre_attn_scalar=32,
    )
    want = transformers.Gemma3TextConfig(**old3)
    spec = spec_from_hf_config(dict(old3, architectures=["Gemma3ForCausalLM"]))
    assert spec.layer_types == tuple(want.layer_types) and "full_attention" in spec.layer_types
    full, local = want.rope_parameters["full_attention"], want.rope_parameters["sliding_attention"]
    assert spec.rope_theta == full["rope_theta"] and spec.rope_local_theta == local["rope_theta"]
    assert spec.rope_scaling is not None and spec.rope_scaling.factor == full["factor"]
    assert spec.attention_scale == pytest.approx(want.query_pre_attn_scalar**-0.5)

    old2 = dict(shape, num_hidden_layers=5, intermediate_size=144, sliding_window=32)
    want = transformers.Gemma2Config(**old2)
    spec = spec_from_hf_config(dict(old2, architectures=["Gemma2ForCausalLM"]))
    assert spec.layer_types == tuple(want.layer_types)
    assert spec.attn_logit_softcap == want.attn_logit_softcapping
    assert spec.final_logit_softcap == want.final_logit_softcapping
    assert spec.attention_scale == pytest.approx(want.query_pre_attn_scalar**-0.5)


def test_gguf_metadata_follows_llama_cpp_defaults() -> None:
    """llama.cpp's gemma2.cpp / gemma3.cpp rules, by hand: Gemma 2 windows 4096 and caps 50 / 30 when
    the keys are missing, every other layer sliding; Gemma 3 slides only with a window, five of every
    six layers or per a flag array, local base 10000; the 27B layer counts scale by hidden / heads."""
    from flashdecode.models import gemma

    def reader(meta: dict[str, Any]) -> Callable[..., Any]:
        return lambda key, default=None, required=True: meta.get(key, default)

    g2 = gemma.gguf_fields(reader({}), "gemma2", 4, 2304, 8, 256)
    assert (g2["sliding_window"], g2["attn_logit_softcap"], g2["final_logit_softcap"]) == (4096, 50.0, 30.0)
    assert g2["layer_types"] == ("sliding_attention", "full_attention") * 2
    assert g2["attention_scale"] == 256**-0.5 and g2["rope_local_theta"] is None
    assert gemma.gguf_fields(reader({}), "gemma2", 46, 4608, 32, 128)["attention_scale"] == 144**-0.5

    assert gemma.gguf_fields(reader({}), "gemma3", 7, 1152, 4, 256)["layer_types"] == ()
    g3 = gemma.gguf_fields(reader({"attention.sliding_window": 512}), "gemma3", 7, 1152, 4, 256)
    assert g3["layer_types"] == ("sliding_attention",) * 5 + ("full_attention", "sliding_attention")
    assert g3["rope_local_theta"] == 10000.0 and g3["attn_logit_softcap"] is None
    flags = [True, False, False]
    meta = {"attention.sliding_window": 8, "attention.sliding_window_pattern": flags}
    g3 = gemma.gguf_fields(reader(meta), "gemma3", 3, 96, 6, 40)
    assert g3["layer_types"] == ("sliding_attention", "full_attention", "full_attention")


# Gemma 3 with 4 heads and an intermediate of 160: every matrix row a multiple of 32 long, all Q8_0
GEMMA3_Q8_SHAPES = dict(num_attention_heads=4, intermediate_size=160)


@pytest.mark.parametrize("arch", mf.GEMMA_ARCHS)
def test_gguf_q8_0_matches_transformers_dequantized(
    arch: str, gguf_model: Callable[..., Path], hf_reference: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every matrix in Q8_0 (run quantized), against transformers holding the weights gguf-py
    dequantizes (the file's norms are 1 + w: transformers takes w): through the native whole step
    (kernels/cpu/decode_step.c) and through the Python layers."""
    import gguf

    from flashdecode.layers.quant import QuantizedTensor
    from flashdecode.models.native_decode import NativeDecode

    shapes = GEMMA3_Q8_SHAPES if arch == "gemma3" else {}
    path = gguf_model(arch, "Q8_0", **shapes)
    loaded = load_model(path).weights
    assert all(
        isinstance(loaded[f"layers.0.{n}"], QuantizedTensor) for n in ("q", "k", "v", "o", "gate", "down")
    )
    ref = copy.deepcopy(hf_reference(arch, **shapes))
    tensors = mf.read_gguf_tensors(path)
    model_arch = gguf.MODEL_ARCH.GEMMA2 if arch == "gemma2" else gguf.MODEL_ARCH.GEMMA3
    tensor_map = gguf.get_tensor_name_map(model_arch, ref.config.num_hidden_layers)
    state = ref.state_dict()
    for name in state:
        gguf_name = tensor_map.get_name(name, try_suffixes=(".weight",))
        if gguf_name in tensors:
            value = torch.from_numpy(tensors[gguf_name][1].copy())
            state[name] = value - 1.0 if name.endswith("norm.weight") else value
    if ref.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied: one tensor, loaded last
    ref.load_state_dict(state)
    head = "token_embd.weight" if ref.config.tie_word_embeddings else "output.weight"
    assert torch.equal(ref.lm_head.weight, torch.from_numpy(tensors[head][1].copy()))
    ref.eval()
    prompts = parity.prompts_for(ref.config.vocab_size)
    llm = parity.make_llm(path)
    requests = [{"prompt_token_ids": p} for p in prompts]
    check_outputs(llm.generate(requests, parity.sampling_params()), prompts, ref, f"{arch} native Q8_0")
    assert llm.engine.model.native._steps  # the native step ran
    monkeypatch.setattr(NativeDecode, "step", lambda self, *args: None)
    check_outputs(llm.generate(requests, parity.sampling_params()), prompts, ref, f"{arch} Python Q8_0")


def test_triton_backend_matches_cpu(gguf_model: Callable[..., Path]) -> None:
    """``device="cuda"`` (the Triton flat GEMM; under the interpreter on host memory without a GPU):
    Gemma 2's embedding scale, fp32 norms, caps and windows give the CPU's tokens and logprobs, with the
    capped attention on the torch paths (tests/test_device.py's harness)."""
    import test_device as device_helpers

    path = gguf_model("gemma2", "Q8_0")
    _, cpu_outs = device_helpers._run(path, "cpu", "unified", 4)
    llm, dev_outs = device_helpers._run(path, "cuda", "unified", 4)
    assert llm.engine.device.backend == "triton"
    assert all(lin.plan == [(1, "triton")] for lin in llm.engine.model.linears())
    assert llm.engine.stats().attention_rows_checked > 0
    device_helpers._assert_same(cpu_outs, dev_outs)
