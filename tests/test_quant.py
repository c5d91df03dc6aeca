"""GGUF block formats kept for native execution (ops/quant.py) and the native kernel build
(ops/cpu_kernels.py): exact repacks, ISA probing, and falling back when nothing builds."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from model_factory import random_k_blocks  # tests/ is on sys.path (conftest)

from flashdecode.kernels.cpu import build as cpu_kernels
from flashdecode.layers.quant import (
    BYTE_FORMATS,
    NATIVE_FORMATS,
    REPACKED_FORMATS,
    QuantizedTensor,
    prepare_weights,
    quantize,
)

gguf = pytest.importorskip("gguf")


def gguf_blocks(w: np.ndarray, fmt: str) -> np.ndarray:
    return gguf.quants.quantize(w.astype(np.float32), gguf.GGMLQuantizationType[fmt])


def awkward_matrix(n: int, k: int, seed: int) -> np.ndarray:
    """Random rows plus the blocks that break careless code: all zeros, constant, tiny (fp16
    subnormal scales), huge, all negative (Q4_1 with a negative min)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.01, 3.0, (n, 1)).astype(np.float32)
    w[0, :32] = 0.0
    w[1 % n, :32] = 0.25
    w[2 % n, 32:64] = rng.standard_normal(32) * 1e-6
    w[3 % n, :32] = rng.standard_normal(32) * 3000.0
    w[4 % n, :32] = -np.abs(rng.standard_normal(32)) - 5.0
    return w


def gguf_dense(fmt: str, blocks: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """What gguf-py decodes a matrix's GGUF blocks to: the independent reference of every product."""
    return torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[fmt]).reshape(shape))


def assert_decodes_as_gguf(qt: QuantizedTensor, blocks: np.ndarray) -> None:
    """Bit for bit what gguf-py decodes the file's blocks to, on every path: the torch reference, the
    native dequantizer, embedding rows, and bf16 (rounded once, from the exact values)."""
    n, k = qt.shape
    ref = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qt.format]).reshape(n, k))
    assert torch.equal(qt._dequant_torch().view(torch.int32), ref.view(torch.int32))
    assert torch.equal(qt.dequantize().view(torch.int32), ref.view(torch.int32))
    ids = torch.tensor([[n - 1, 0], [1 % n, n // 2]])
    assert torch.equal(qt.rows(ids), ref[ids])
    assert torch.equal(qt.dequantize(torch.bfloat16), ref.bfloat16())


ENCODED_K_QUANTS = ("Q4_K", "Q6_K", "Q2_K")


def k_quant_cases() -> list[tuple[str, np.ndarray, int, int]]:
    from model_factory import quantize as encode  # tests/model_factory.py: Q2_K, Q4_K, Q6_K encoders

    shapes = ((7, 256), (33, 512))
    cases = [(fmt, random_k_blocks(fmt, n, k, seed=n), n, k) for fmt in REPACKED_FORMATS for n, k in shapes]
    for fmt in ENCODED_K_QUANTS:  # real encodings of awkward weights
        cases.append((fmt, encode(awkward_matrix(9, 512, seed=5), gguf.GGMLQuantizationType[fmt]), 9, 512))
    return cases


@pytest.mark.parametrize("case", range(len(REPACKED_FORMATS) * 2 + len(ENCODED_K_QUANTS)))
def test_k_quant_repack_is_bit_exact_against_gguf(case: int) -> None:
    fmt, blocks, n, k = k_quant_cases()[case]
    qt = QuantizedTensor.from_gguf_blocks(fmt, blocks, (n, k))
    assert tuple(qt.shape) == (n, k)
    assert_decodes_as_gguf(qt, blocks)
    with pytest.raises(ValueError, match="repacked"):
        qt.to_gguf_blocks()
    with pytest.raises(ValueError, match="multiple of 256"):
        QuantizedTensor.from_gguf_blocks(fmt, blocks, (n, k - 32))


@pytest.mark.parametrize("fmt", BYTE_FORMATS)
@pytest.mark.parametrize("shape", [(7, 64), (33, 96), (64, 576)])
def test_repack_is_bit_exact_against_gguf(fmt: str, shape: tuple[int, int]) -> None:
    n, k = shape
    blocks = gguf_blocks(awkward_matrix(n, k, seed=n), fmt)
    qt = QuantizedTensor.from_gguf_blocks(fmt, blocks, (n, k))
    assert tuple(qt.shape) == (n, k)
    assert qt.nbytes == blocks.nbytes  # planes hold exactly the file's bytes, no more
    np.testing.assert_array_equal(qt.to_gguf_blocks().reshape(-1), blocks.reshape(-1))
    assert_decodes_as_gguf(qt, blocks)


@pytest.mark.parametrize("fmt", BYTE_FORMATS)
def test_quantize_matches_llama_cpp_reference(fmt: str) -> None:
    w = awkward_matrix(16, 128, seed=3)
    ours = quantize(torch.from_numpy(w), fmt).to_gguf_blocks().reshape(-1)
    ref = gguf_blocks(w, fmt).reshape(-1)
    assert (ours != ref).mean() < 1e-3  # the same rounding rules; fp32 ties may rarely differ


def test_row_surgery() -> None:
    w = torch.randn(12, 64)
    qt = quantize(w, "Q4_1")
    perm = torch.randperm(12)
    assert torch.equal(qt.map_rows(lambda t: t[perm]).dequantize(), qt.dequantize()[perm])
    other = quantize(torch.randn(5, 64), "Q4_1")
    assert torch.equal(
        QuantizedTensor.cat([qt, other]).dequantize(), torch.cat([qt.dequantize(), other.dequantize()])
    )
    with pytest.raises(ValueError):
        QuantizedTensor.cat([qt, quantize(torch.randn(5, 64), "Q8_0")])
    with pytest.raises(ValueError):
        quantize(torch.randn(4, 40), "Q8_0")  # rows must be whole blocks


def test_prepare_weights_quantizes_float_matrices_only() -> None:
    weights = {
        "embed": torch.randn(50, 64),
        "layers.0.q": torch.randn(64, 64),
        "layers.0.attn_norm": torch.randn(64),
        "layers.0.q_bias": torch.randn(64),
        "layers.0.down": torch.randn(64, 48),  # rows not a multiple of 32: stays float
    }
    matrices = {"embed", "layers.0.q", "layers.0.down"}  # what ModelSpec.matrices() names
    out = prepare_weights(weights, torch.float32, matrices, "int4")
    assert isinstance(out["embed"], QuantizedTensor) and out["embed"].format == "Q4_1"
    assert isinstance(out["layers.0.q"], QuantizedTensor)
    assert not isinstance(out["layers.0.down"], QuantizedTensor)
    assert out["layers.0.attn_norm"].dtype == torch.float32
    assert prepare_weights(weights, torch.float32, matrices, "int8")["layers.0.q"].format == "Q8_0"
    # quantization error of group-wise int8 is small
    err = (out["layers.0.q"].dequantize() - weights["layers.0.q"]).abs().max()
    assert err < 0.5
    with pytest.raises(ValueError):
        prepare_weights(weights, torch.float32, matrices, "int3")


def test_embedded_model_keeps_its_blocks() -> None:
    from flashdecode.models.gguf_loader import load_gguf, read_gguf
    from flashdecode.models.loader import embedded_model_path

    path = embedded_model_path()
    loaded = load_gguf(path)
    raw = {t.name: t for t in read_gguf(path).tensors}
    down = loaded.weights["layers.3.down"]
    assert isinstance(down, QuantizedTensor) and down.format == "Q4_1"
    np.testing.assert_array_equal(
        down.to_gguf_blocks().reshape(-1), np.asarray(raw["blk.3.ffn_down.weight"].data).reshape(-1)
    )
    embed = loaded.weights["embed"]
    assert isinstance(embed, QuantizedTensor) and embed.format == "Q8_0"
    # Q/K rows were un-permuted as whole rows of blocks: dequantizing commutes with the permutation
    q_raw = raw["blk.0.attn_q.weight"]
    ref = torch.from_numpy(
        gguf.quants.dequantize(np.asarray(q_raw.data), q_raw.tensor_type).reshape(576, 576)
    )
    from flashdecode.models.gguf_loader import _unpermute_qk

    assert torch.equal(loaded.weights["layers.0.q"].dequantize(), _unpermute_qk(ref, 9))
    loaded.validate()


# --- the native build ------------------------------------------------------------------------------


def test_isa_probing() -> None:
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        assert cpu_kernels.supported_builds() == ["generic"]
        return
    assert cpu_kernels.supported_builds(set()) == ["generic"]
    assert cpu_kernels.supported_builds({"avx2", "fma", "f16c"}) == ["avx2", "generic"]
    every = set().union(*(needs for needs, _ in cpu_kernels.ISA_BUILDS.values()))
    assert cpu_kernels.supported_builds(every) == ["avx512", "avx2", "generic"]
    # an AVX-512 build without one of its extensions is never chosen
    assert "avx512" not in cpu_kernels.supported_builds(every - {"avx512bw"})


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_every_build_this_cpu_runs_is_correct(isa: str, native_kernels) -> None:
    if isa not in cpu_kernels.supported_builds():
        pytest.skip(f"this CPU cannot run the {isa} build")  # legitimate: the ISA, not a missing build
    lib = cpu_kernels.load(isa)
    assert lib is not None  # built and passed its self-test
    assert lib.isa == isa
    gen = torch.Generator().manual_seed(1)
    for fmt in NATIVE_FORMATS:
        if fmt in BYTE_FORMATS:
            w = quantize(torch.randn(37, 96, generator=gen), fmt)
            blocks = w.to_gguf_blocks()
        else:
            blocks = random_k_blocks(fmt, 37, 256, seed=2)
            w = QuantizedTensor.from_gguf_blocks(fmt, blocks, (37, 256))
        k = w.shape[1]
        dense = gguf_dense(fmt, blocks, (37, k))
        ref_w = dense.double()
        assert torch.equal(lib.dequant(fmt, w.planes()).view(torch.int32), dense.view(torch.int32))
        for m in (1, 3, 4, 5, 8, 13, 40):
            x = torch.randn(m, k, generator=gen)
            bias = torch.randn(37, generator=gen)
            y = lib.linear(fmt, x, (w.qs, w.d, w.m), 37, bias)
            ref = x.double() @ ref_w.T + bias.double()
            bound = 1e-5 * (x.double().abs() @ ref_w.abs().T) + 1e-5
            assert ((y.double() - ref).abs() <= bound).all(), (fmt, m)


def test_large_m_runs_in_passes_that_match_one_product(native_kernels) -> None:
    """M large enough that fd_linear splits the activations into L2-sized passes (K = 2048: 48 rows a
    pass), with uneven passes and a bias: the same result as the reference."""
    lib = native_kernels
    gen = torch.Generator().manual_seed(3)
    w = quantize(torch.randn(21, 2048, generator=gen), "Q4_1")
    x, bias = torch.randn(101, 2048, generator=gen), torch.randn(21, generator=gen)
    ref_w = gguf_dense("Q4_1", w.to_gguf_blocks(), (21, 2048)).double()
    ref = x.double() @ ref_w.T + bias.double()
    y = lib.linear("Q4_1", x, (w.qs, w.d, w.m), 21, bias)
    assert ((y.double() - ref).abs() <= 1e-5 * (x.double().abs() @ ref_w.abs().T) + 1e-5).all()


def _failing_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("FLASHDECODE_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: "false")


def test_failed_build_is_an_error_where_native_kernels_are_required(monkeypatch, tmp_path) -> None:
    _failing_compiler(monkeypatch, tmp_path)
    monkeypatch.setenv("FLASHDECODE_REQUIRE_NATIVE", "1")  # as CI sets it
    with pytest.raises(RuntimeError, match="FLASHDECODE_REQUIRE_NATIVE"):
        cpu_kernels.load()


def test_failed_build_falls_back_with_a_warning(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    _failing_compiler(monkeypatch, tmp_path)
    monkeypatch.delenv("FLASHDECODE_REQUIRE_NATIVE", raising=False)
    with pytest.warns(RuntimeWarning, match="native CPU kernels unavailable"):
        assert cpu_kernels.load() is None
    # the engine's weights still load: blocks are dequantized once, with the warning already given
    weights = {"layers.0.q": quantize(torch.randn(8, 32), "Q8_0")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_kernels.load() is None  # remembered: no second warning
        out = prepare_weights(weights, torch.float32, {"layers.0.q"}, keep_blocks=False)
    assert isinstance(out["layers.0.q"], torch.Tensor)
    ref = gguf_dense("Q8_0", weights["layers.0.q"].to_gguf_blocks(), (8, 32))
    assert torch.equal(out["layers.0.q"].view(torch.int32), ref.view(torch.int32))


def test_native_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("FLASHDECODE_NATIVE", "0")
    assert cpu_kernels.load() is None


@pytest.mark.parametrize(("quantization", "mean_diff"), [("int8", 0.1), ("int4", 1.0)])
def test_load_time_quantization_of_a_float_model(hf_model, quantization: str, mean_diff: float) -> None:
    """A safetensors (float) model served quantized: its matrices become Q8_0 / Q4_1 and its
    log-probabilities stay near the float model's. The random test models have peaked logits that
    amplify weight error: measured mean |difference| 0.04 nats (int8) and 0.5 (int4)."""
    from flashdecode import LLM, SamplingParams

    path = hf_model("llama")
    params = SamplingParams(max_tokens=1, prompt_logprobs=1)
    ids = list(range(3, 40))

    def scores(llm: LLM) -> list[float]:
        out = llm.generate({"prompt_token_ids": ids}, params)[0]
        return [entry[ids[t]].logprob for t, entry in enumerate(out.prompt_logprobs) if entry is not None]

    ref = scores(LLM(model=str(path), num_threads=1))
    llm = LLM(model=str(path), num_threads=1, quantization=quantization)
    layer = llm.engine.model.layers[0]
    assert isinstance(layer.qkv.weight, QuantizedTensor)
    assert layer.qkv.weight.format == {"int8": "Q8_0", "int4": "Q4_1"}[quantization]
    got = scores(llm)
    assert sum(abs(a - b) for a, b in zip(ref, got)) / len(ref) < mean_diff
