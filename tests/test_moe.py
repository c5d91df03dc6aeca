"""Mixture of experts: Mixtral, Qwen2-MoE and Qwen3-MoE against transformers on random models
(tests/model_factory.py ``MOE_ARCHS``), and the grouped expert loop against a per-token reference.

The models: Mixtral top-2 of 4 (head_dim 24, GQA 6:2), Qwen2-MoE top-2 of 8 with its gated shared
expert and no renormalisation (head_dim 16), Qwen3-MoE top-2 of 8 renormalised with q/k norms
(head_dim 48, GQA 4:2). Each is checked from its safetensors folder and from a GGUF with stacked
experts as llama.cpp writes it: top-5 logprobs at every position within 1e-3 and 32 greedy tokens equal
to ``generate``, batches of three sequences whose tokens pick different experts. Quantized GGUFs run
every expert in its block format.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

# the Triton kernels run under the interpreter on CPU tensors (test_triton_backend_matches_cpu); set
# before triton is first imported, as tests/test_gemma.py does
os.environ["TRITON_INTERPRET"] = "1"

import model_factory as mf  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import test_hf_parity as parity  # noqa: E402  (tests/ is on sys.path; its helpers)
import test_native_decode as native_helpers  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flashdecode import LLM  # noqa: E402
from flashdecode.layers.dataflow import configure  # noqa: E402
from flashdecode.layers.linear import Linear, fused_linear, iter_linears  # noqa: E402
from flashdecode.layers.moe import GatedMLP, SparseMoE  # noqa: E402
from flashdecode.layers.quant import QuantizedTensor  # noqa: E402
from flashdecode.models.loader import load_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py


class ExpertLog:
    """Every MoE call of an engine's decoder: its token count and the rows each expert that ran got.
    The decoder runs the Python layers from then on: they are what is logged (the native step's
    experts are test_native_step_runs_the_experts's)."""

    def __init__(self, decoder: Any):
        self.calls: list[tuple[int, dict[int, int]]] = []
        self.top_k = 0
        decoder.native = None
        for layer in decoder.layers:
            if isinstance(layer.mlp, SparseMoE):
                moe = layer.mlp
                self.top_k = moe.top_k
                moe.experts = [self._expert(e, f) for e, f in enumerate(moe.experts)]
                layer.mlp = self._moe(moe)

    def _moe(self, moe: SparseMoE) -> Callable[[torch.Tensor], torch.Tensor]:
        def call(x: torch.Tensor) -> torch.Tensor:
            self.calls.append((x.shape[0], {}))
            return moe(x)

        return call

    def _expert(self, e: int, expert: GatedMLP) -> Callable[[torch.Tensor], torch.Tensor]:
        def call(x: torch.Tensor) -> torch.Tensor:
            assert e not in self.calls[-1][1], f"expert {e} ran twice in one step"
            self.calls[-1][1][e] = x.shape[0]
            return expert(x)

        return call

    def check(self) -> None:
        """Each call ran each token through top_k experts, each expert once over its tokens; several
        experts ran per step, and batched tokens picked different ones (more experts than one token
        can choose)."""
        assert self.calls
        for tokens, rows in self.calls:
            assert sum(rows.values()) == tokens * self.top_k
            assert len(rows) > 1
        assert any(len(rows) > self.top_k for tokens, rows in self.calls if tokens > 1)
        decodes = [rows for tokens, rows in self.calls if tokens == 3]  # the three sequences' steps
        assert any(len(rows) > self.top_k for rows in decodes)


def run_parity(path: Path, ref: Any, label: str) -> None:
    prompts = parity.prompts_for(ref.config.vocab_size)
    llm = parity.make_llm(path)
    log = ExpertLog(llm.engine.model)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], parity.sampling_params())
    log.check()
    assert len(outs) == len(prompts)
    for k, (out, prompt) in enumerate(zip(outs, prompts)):
        parity.check_request(out, prompt, ref, f"{label} request {k}")
        parity.check_greedy(out, prompt, ref, f"{label} request {k}")


@pytest.mark.parametrize("arch", mf.MOE_ARCHS)
def test_hf_folder_matches_transformers(arch: str, hf_model: Callable[..., Path], hf_reference: Any) -> None:
    run_parity(hf_model(arch), hf_reference(arch), f"{arch} hf")


@pytest.mark.parametrize("arch", mf.MOE_ARCHS)
def test_gguf_f32_matches_transformers(arch: str, gguf_model: Callable[..., Path], hf_reference: Any) -> None:
    """GGUF F32 as llama.cpp's converter writes it: experts stacked per layer (ffn_*_exps), Mixtral
    as "llama" with Q/K rows permuted; F32 holds the weights exactly, so the reference is the HF model."""
    path = gguf_model(arch)
    assert any(name.endswith("ffn_gate_exps.weight") for name in mf.read_gguf_tensors(path))
    run_parity(path, hf_reference(arch), f"{arch} gguf F32")


def _dequantized_reference(ref: Any, path: Path, arch: str) -> Any:
    """``ref`` holding the weights gguf-py dequantizes from ``path`` (transformers 5 stacks each
    layer's experts as gate_up [n_expert, 2 * ff, hidden] and down [n_expert, hidden, ff])."""
    import gguf

    tensors = {name: torch.from_numpy(a.copy()) for name, (_, a) in mf.read_gguf_tensors(path).items()}
    ref = copy.deepcopy(ref)
    n_layers, cfg = ref.config.num_hidden_layers, ref.config
    member = {"mixtral": "LLAMA", "qwen2moe": "QWEN2MOE", "qwen3moe": "QWEN3MOE"}[arch]
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[member], n_layers)
    state = ref.state_dict()
    for name in state:
        gguf_name = tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name in tensors:
            value = tensors[gguf_name]
            if arch == "mixtral" and ".q_proj." in name:
                value = mf.unpermute(value, cfg.num_attention_heads)
            if arch == "mixtral" and ".k_proj." in name:
                value = mf.unpermute(value, cfg.num_key_value_heads)
            state[name] = value
    for i in range(n_layers):
        gate, up, down = (tensors[f"blk.{i}.ffn_{w}_exps.weight"] for w in ("gate", "up", "down"))
        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        state[f"model.layers.{i}.mlp.experts.down_proj"] = down
    ref.load_state_dict(state)
    return ref.eval()


@pytest.mark.parametrize(("arch", "tensor_type"), [("qwen3moe", "Q8_0"), ("mixtral", "Q4_0")])
def test_quantized_gguf_runs_experts_quantized(
    arch: str, tensor_type: str, gguf_model: Callable[..., Path], hf_reference: Any
) -> None:
    """Every expert keeps its GGUF blocks (split from the stacked tensor, never dequantized) and runs
    as a Linear of that format; the router stays F32 as llama.cpp writes it. The reference is
    transformers holding gguf-py's dequantized weights."""
    path = gguf_model(arch, tensor_type)
    loaded = load_model(path)
    spec = loaded.spec
    experts = [n for n in loaded.weights if ".experts." in n]
    assert len(experts) == spec.num_layers * spec.num_experts * 3
    assert all(isinstance(loaded.weights[n], QuantizedTensor) for n in experts)
    assert {loaded.weights[n].format for n in experts} == {tensor_type}
    assert loaded.formats["layers.0.router"] == "F32"
    llm = parity.make_llm(path)
    formats = {lin.format for e in llm.engine.model.layers[0].mlp.experts for lin in e.projections()}
    assert formats == {tensor_type}
    del llm
    run_parity(path, _dequantized_reference(hf_reference(arch), path, arch), f"{arch} gguf {tensor_type}")


def test_dense_layers(hf_model: Callable[..., Path], hf_reference: Any) -> None:
    """Qwen2-MoE with ``mlp_only_layers``: that layer keeps the dense MLP (intermediate_size), the
    others route; llama.cpp's qwen2moe graph has no dense layers, so the converter refuses the model."""
    path, ref = hf_model("qwen2moe", mlp_only_layers=[1]), hf_reference("qwen2moe", mlp_only_layers=[1])
    spec = load_model(path).spec
    assert spec.dense_layers == (1,) and [spec.moe_at(i) for i in range(3)] == [True, False, True]
    run_parity(path, ref, "qwen2moe mlp_only_layers=[1] hf")
    with pytest.raises(NotImplementedError, match="dense layers"):
        mf.hf_to_gguf(path, path.parent / "dense.gguf")


def test_decoder_sparse_step_from_config() -> None:
    """transformers' rule: layer i is sparse when (i + 1) % decoder_sparse_step == 0 and i is not in
    mlp_only_layers (hand arithmetic for 6 layers, step 2, mlp_only_layers [3])."""
    from flashdecode.models import moe
    from flashdecode.models.spec import FAMILIES

    config = dict(num_experts=4, moe_intermediate_size=32, decoder_sparse_step=2, mlp_only_layers=[3])
    fields = moe.hf_fields(config, FAMILIES["qwen3moe"], 6)
    assert fields["dense_layers"] == (0, 2, 3, 4)
    assert fields["norm_topk_prob"] is False  # transformers' Qwen default


def test_specs_from_both_sources_agree(
    hf_model: Callable[..., Path], gguf_model: Callable[..., Path]
) -> None:
    """The same expert fields from config.json and from GGUF metadata (Mixtral's "llama" file named
    mixtral by its expert count); the native decode step takes MoE models."""
    for arch in mf.MOE_ARCHS:
        hf, gg = load_model(hf_model(arch)).spec, load_model(gguf_model(arch)).spec
        assert hf.family == gg.family and hf.family.moe
        for name in (
            "num_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
            "norm_topk_prob",
            "dense_layers",
        ):
            assert getattr(hf, name) == getattr(gg, name), (arch, name)
        assert hf.native_block
        assert any("mixture of experts" in f for f in hf.features())
    cfg = mf.arch_config("qwen2moe")
    spec = load_model(hf_model("qwen2moe")).spec
    assert (spec.num_experts, spec.shared_expert_intermediate_size) == (
        cfg["num_experts"],
        cfg["shared_expert_intermediate_size"],
    )


def _reference_moe(x: torch.Tensor, w: dict[str, Any], top_k: int, renormalize: bool) -> torch.Tensor:
    """The MoE MLP one token and one chosen expert at a time, in float64."""
    x = x.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(w["router"].double() @ x[t], dim=-1)
        weights, ids = probs.topk(top_k)
        if renormalize:
            weights = weights / weights.sum()
        for weight, e in zip(weights, ids.tolist()):
            g, u, d = (m.double() for m in w["experts"][e])
            out[t] += weight * (d @ (F.silu(g @ x[t]) * (u @ x[t])))
        if "shared" in w:
            g, u, d = (m.double() for m in w["shared"])
            gate = torch.sigmoid(w["shared_gate"].double() @ x[t])
            out[t] += gate * (d @ (F.silu(g @ x[t]) * (u @ x[t])))
    return out


@pytest.mark.parametrize(("renormalize", "shared"), [(True, False), (False, True)])
def test_grouped_experts_match_per_token_reference(renormalize: bool, shared: bool) -> None:
    """SparseMoE (tokens grouped by expert, one product per active expert, index_add back) equals the
    per-token loop, for a batch of 13 tokens over top-3 of 6 experts."""
    g = torch.Generator().manual_seed(3)
    hidden, inter, n_exp, top_k, tokens = 40, 24, 6, 3, 13

    def mat(n: int, k: int) -> torch.Tensor:
        return torch.randn(n, k, generator=g) / k**0.5

    w: dict[str, Any] = {
        "router": mat(n_exp, hidden),
        "experts": [(mat(inter, hidden), mat(inter, hidden), mat(hidden, inter)) for _ in range(n_exp)],
    }
    if shared:
        w["shared"] = (mat(32, hidden), mat(32, hidden), mat(hidden, 32))
        w["shared_gate"] = mat(1, hidden)

    def gated(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> GatedMLP:
        return GatedMLP(fused_linear([gate, up]), Linear(down), F.silu)

    moe = SparseMoE(
        Linear(w["router"]),
        [gated(*e) for e in w["experts"]],
        top_k,
        renormalize,
        gated(*w["shared"]) if shared else None,
        w.get("shared_gate"),
    )
    configure(moe.projections(), "off", None)
    x = torch.randn(tokens, hidden, generator=g)
    got = moe(x)
    assert torch.allclose(got.double(), _reference_moe(x, w, top_k, renormalize), atol=1e-5)


def test_roofline_counts_active_experts(hf_model: Callable[..., Path]) -> None:
    """Qwen3-MoE's decode bytes per step read the other weights whole and each routed expert where a
    token chose it: top 2 of 8 is a quarter of the experts at batch 1, 1 - (3/4)^2 at batch 2 (uniform
    routing); a token's multiply-adds run its 2 experts. Hand arithmetic, F32 (4 bytes a weight):
    per layer q 192x64, k and v 96x64, o 64x192, router 8x64 (37376), 8 experts of 3 x 96x64 (147456),
    norms 64 + 64 + 48 + 48; the head 512x64 and the final norm 64; two layers."""
    from flashdecode.tools.roofline import ModelCost

    cost = ModelCost(load_model(hf_model("qwen3moe")).spec)
    rest = 2 * 37376 + 512 * 64
    vectors = 2 * 224 + 64
    assert cost.matmul_params() == rest + 2 * 147456 // 4
    assert cost.decode_step(1, 10).weight_bytes == 4 * (rest + 2 * 147456 / 4 + vectors) + 4 * 64
    assert cost.decode_step(2, 10).weight_bytes == 4 * (rest + 2 * 147456 * (1 - 0.75**2) + vectors) + 8 * 64


def test_triton_backend_matches_cpu(gguf_model: Callable[..., Path]) -> None:
    """``device="cuda"`` (the Triton flat GEMM; under the interpreter on host memory without a GPU):
    Q8_0 experts, router and shared expert on the Triton kernels give the CPU's tokens and logprobs
    (tests/test_device.py's harness)."""
    import test_device as device_helpers

    path = gguf_model("qwen2moe", "Q8_0")
    _, cpu_outs = device_helpers._run(path, "cpu", "exact", 4)
    llm, dev_outs = device_helpers._run(path, "cuda", "exact", 4)
    assert llm.engine.device.backend == "triton"
    experts = llm.engine.model.layers[0].mlp.experts
    assert all(
        lin.plan == [(1, "triton")] and lin.format == "Q8_0" for e in experts for lin in e.projections()
    )
    device_helpers._assert_same(cpu_outs, dev_outs)


# every projection but the router (F32, as llama.cpp writes routers) in a native format: Mixtral with
# head_dim 32, so that its o projection's rows (heads * head_dim) split into 32-blocks. The last two
# run every quantized projection with int8 activations (on the stored planes, on the repacked ones).
MOE_PROMPTS = ["The engine", "Decoding is memory bound: each step reads every weight once", "A softmax " * 6]
NATIVE_MOE = [
    ("mixtral", dict(head_dim=32), "native"),
    ("qwen2moe", {}, "native"),
    ("qwen3moe", {}, "native"),
    ("qwen2moe", {}, "native_i8"),
    ("qwen3moe", {}, "native_q8"),
]


@pytest.mark.parametrize(("arch", "shapes", "kernel"), NATIVE_MOE)
def test_native_step_runs_the_experts(
    arch: str, shapes: dict, kernel: str, gguf_model: Callable[..., Path], native_kernels: Any, monkeypatch
) -> None:
    """The native decode step (kernels/cpu/decode_step.c) routes, groups and runs the experts as the
    Python layers do: the same greedy tokens and log-probabilities to summation order for three
    sequences' prompts and decodes, and as many expert products (one per chosen expert, layer and
    step) as the Python layers' grouped loop ran, several a step, the batch's rows choosing different
    experts (ExpertLog.check); a sequence decoding alone gets the bits it gets beside the others."""
    from flashdecode.models.native_decode import ROUTER_F32, STEP_KERNELS

    if kernel != "native" and not (native_kernels.has_i8 if kernel == "native_i8" else native_kernels.has_q8):
        pytest.skip(f"{native_kernels.isa} build: no {kernel}")
    # no prefix cache: the Python layers' run recomputes the prompts, so the two run the same steps
    path = gguf_model(arch, "Q8_0", **shapes)
    llm = LLM(
        model=str(path), max_model_len=512, num_threads=2, numerics="exact", enable_prefix_caching=False
    )
    for lin in iter_linears(llm.engine.model.linears()):
        if lin.format == "Q8_0":
            lin.set_plan([(1, kernel)])
    native = native_helpers.run(llm, MOE_PROMPTS)
    steps = llm.engine.model.native._steps
    assert steps and all(step._structs for step in steps.values())  # every step built holds the MoE layers
    assert {mode for key in steps for mode in key[0]} == {STEP_KERNELS[kernel], ROUTER_F32}
    products = sum(int(step.stats[2]) for step in steps.values())
    # a row's experts run as the same bits whoever else chose them (rows are never mixed in a product)
    native_helpers.assert_same(native_helpers.run(llm, MOE_PROMPTS[1:2]), native[1:2], tol=0.0)
    log = ExpertLog(llm.engine.model)
    python = native_helpers.python_layers(llm, monkeypatch, MOE_PROMPTS)
    log.check()
    assert products == sum(len(rows) for _, rows in log.calls)
    # int8 activations: the same rounding on both sides, but a 1-ulp difference can move one
    # (tests/test_native_decode.py's test_int8_activations)
    native_helpers.assert_same(native, python, tol=2e-4 if kernel == "native" else 0.15)
