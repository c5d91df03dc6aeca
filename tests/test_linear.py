"""Every candidate kernel of layers/linear.py against the reference x @ dequant(W)^T, and the dispatch."""

from __future__ import annotations

import itertools
import zlib

import gguf
import pytest
import torch

from flashdecode.kernels.cpu import build as cpu_kernels
from flashdecode.kernels.formats import I8_FORMATS, bytes_per_weight
from flashdecode.layers.dataflow import DEFAULT_BF16_NATIVE_MAX_M, configure, default_plan, static_candidate
from flashdecode.layers.linear import (
    CANDIDATES,
    MAX_PLAN_M,
    Linear,
    SplitLinear,
    fused_linear,
)
from flashdecode.layers.quant import QuantizedTensor, quantize


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# rows of activations; odd sizes, sizes at the kernel's internal tile edges (4, 5, 8, 9, 32)
MS = (1, 2, 3, 4, 5, 8, 9, 17, 32, 33, 70)


def dense(w: torch.Tensor | QuantizedTensor) -> torch.Tensor:
    """The weight's values in float64: for GGUF blocks, what the ``gguf`` package decodes their bytes
    to (an independent reference, not the code under test)."""
    if isinstance(w, QuantizedTensor):
        blocks = w.to_gguf_blocks()
        values = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[w.format])
        return torch.from_numpy(values.reshape(tuple(w.shape))).double()
    return w.double()


def reference(x: torch.Tensor, w: torch.Tensor | QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ dense(w).T
    return y if bias is None else y + bias.double()


def assert_close(y: torch.Tensor, x: torch.Tensor, w, bias, exact: bool, label: str) -> None:
    """Exact candidates: fp32 accumulation error only, bounded by eps * sum |x| |w| (times a small
    factor for summation order). Approximate ones round to bf16 (8 significant bits)."""
    wd = dense(w)
    scale = x.double().abs() @ wd.abs().T
    rel = 2e-6 * max(1, x.shape[1] // 64) if exact else 2.0**-6
    if x.dtype == torch.bfloat16 or (not isinstance(w, QuantizedTensor) and w.dtype == torch.bfloat16):
        rel = max(rel, 2.0**-7)  # bf16 outputs round once more
    y_ref = x.double() @ wd.T
    err = (y.double() - (y_ref if bias is None else y_ref + bias.double())).abs()
    assert (err <= rel * scale + 1e-5).all(), f"{label}: max err {err.max():.3g}, scale {scale.max():.3g}"


def weights(fmt: str, n: int, k: int, gen: torch.Generator) -> torch.Tensor | QuantizedTensor:
    w = torch.randn(n, k, generator=gen) * 0.5
    if fmt == "F32":
        return w
    if fmt == "BF16":
        return w.bfloat16()
    return quantize(w, fmt)


SHAPES = [(1, 32), (37, 96), (130, 160), (513, 64)]


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0", "BF16", "F32"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_every_candidate_matches_the_reference(fmt: str, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{fmt}{with_bias}".encode()))
    shapes = SHAPES + ([(23, 77), (5, 131)] if fmt in ("BF16", "F32") else [])  # odd K for float weights
    for n, k in shapes:
        w = weights(fmt, n, k, gen)
        bias = torch.randn(n, generator=gen) if with_bias else None
        lin = Linear(w, bias)
        names = lin.candidates(allow_approx=True)
        for name in names:
            fn = lin.impl(name)
            for m in MS:
                xdtype = torch.bfloat16 if fmt == "BF16" else torch.float32
                x = torch.randn(m, k, generator=gen).to(xdtype)
                y = fn(x)
                assert y.shape == (m, n) and y.dtype == xdtype
                assert_close(y, x, w, bias, CANDIDATES[name].exact, f"{fmt} {name} N={n} K={k} M={m}")


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0", "BF16"])
def test_the_flat_gemm_is_a_candidate_of_every_format_it_runs(fmt: str, native_kernels) -> None:
    """With the native kernels loaded, every quantized and bf16 weight can run on the flat GEMM (so
    test_every_candidate_matches_the_reference checks it), and fp32 weights never do."""
    gen = torch.Generator().manual_seed(9)
    for n, k in SHAPES:
        assert "native" in Linear(weights(fmt, n, k, gen)).candidates(), (fmt, n, k)
    assert "native" not in Linear(weights("F32", 37, 96, gen)).candidates(allow_approx=True)


def test_torch_int4_repack_is_exact_where_offered() -> None:
    gen = torch.Generator().manual_seed(5)
    for fmt in ("Q4_0", "Q4_1"):
        w = quantize(torch.randn(64, 128, generator=gen), fmt)
        lin = Linear(w)
        if "torch_int4" not in lin.candidates():
            pytest.skip("this torch build has no CPU int4 weight-only kernel")
        x = torch.randn(3, 128, generator=gen)
        assert_close(lin.impl("torch_int4")(x), x, w, None, True, fmt)
    assert "torch_int4" not in Linear(quantize(torch.randn(24, 64), "Q4_1")).candidates()  # N % 16
    assert "torch_int4" not in Linear(quantize(torch.randn(32, 64), "Q8_0")).candidates()


def test_inputs_of_any_layout() -> None:
    gen = torch.Generator().manual_seed(2)
    w = quantize(torch.randn(40, 64, generator=gen), "Q4_1")
    lin = Linear(w)
    configure([lin])
    base = torch.randn(6, 128, generator=gen)
    x = base[:, ::2]  # non-unit column stride
    assert_close(lin(x), x, w, None, True, "strided")
    x3 = torch.randn(2, 3, 64, generator=gen)  # more than two dims
    y3 = lin(x3)
    assert y3.shape == (2, 3, 40)
    assert_close(y3.reshape(6, 40), x3.reshape(6, 64), w, None, True, "3-d")
    assert lin(torch.empty(0, 64)).shape == (0, 40)


def test_plan_dispatch_is_what_the_plan_says() -> None:
    lin = Linear(quantize(torch.randn(16, 64), "Q8_0"))
    calls: list[str] = []
    for name in lin.candidates():
        real = lin.impl(name)
        lin._impls[name] = lambda x, real=real, name=name: (calls.append(name), real(x))[1]
    plan = [(1, "native"), (3, "dequant_f32"), (9, "native")]
    lin.set_plan(plan)
    expected = {1: "native", 2: "native", 3: "dequant_f32", 8: "dequant_f32", 9: "native", 600: "native"}
    for m, name in expected.items():
        calls.clear()
        lin(torch.randn(m, 64))
        assert calls == [name], m
    assert len(lin._by_m) == MAX_PLAN_M + 1
    lin.set_plan([(1, "dequant_f32")])
    assert set(lin._impls) == {"dequant_f32"}  # formats of unused candidates are released
    with pytest.raises(ValueError):
        lin.set_plan([(1, "torch_f32")])  # not a candidate for quantized weights


def kernels_run_at(lin: Linear, ms: list[int]) -> dict[int, str]:
    """Which candidate the Linear calls for a batch of M rows under its default plan (each candidate's
    kernel wrapped to record its name, as in test_plan_dispatch_is_what_the_plan_says)."""
    calls: list[str] = []
    for name in lin.candidates():
        real = lin.impl(name)
        lin._impls[name] = lambda x, real=real, name=name: (calls.append(name), real(x))[1]
    lin.set_plan(default_plan(lin))
    seen = {}
    for m in ms:
        calls.clear()
        lin(torch.randn(m, lin.in_features).to(lin.compute_dtype))
        assert len(calls) == 1, (m, calls)
        seen[m] = calls[0]
    return seen


def test_default_and_static_plans(native_kernels) -> None:
    q = Linear(quantize(torch.randn(16, 64), "Q4_1"))
    f = Linear(torch.randn(16, 64))
    b = Linear(torch.randn(16, 64).bfloat16())
    assert static_candidate(f) == "torch_f32" and default_plan(f) == [(1, "torch_f32")]
    assert static_candidate(q) == "native" and static_candidate(b) == "native"
    ms = list(range(1, 12)) + [31, 64, 200, 512, 600]
    # quantized weights: the flat GEMM at every M (README: "measured faster than dequantize + torch's
    # fp32 GEMM up to M = 512")
    assert set(kernels_run_at(q, ms).values()) == {"native"}
    # bf16 weights: the flat GEMM at decode sizes, torch's bf16 GEMM at prefill sizes, one switch
    # between them, right after DEFAULT_BF16_NATIVE_MAX_M
    assert 1 <= DEFAULT_BF16_NATIVE_MAX_M < 64
    bf16 = kernels_run_at(b, ms)
    assert bf16[1] == "native" and bf16[512] == bf16[600] == "torch_bf16"
    switch = min(m for m in ms if bf16[m] == "torch_bf16")
    assert switch == DEFAULT_BF16_NATIVE_MAX_M + 1
    assert all(bf16[m] == ("native" if m < switch else "torch_bf16") for m in ms)
    assert set(kernels_run_at(f, [1, 5, 600]).values()) == {"torch_f32"}


def test_fused_projections_of_mixed_formats() -> None:
    gen = torch.Generator().manual_seed(4)
    parts = [quantize(torch.randn(8, 64, generator=gen), "Q4_1"), torch.randn(4, 64, generator=gen)]
    bias = [torch.randn(8, generator=gen), torch.randn(4, generator=gen)]
    fused = fused_linear(parts, bias)
    assert isinstance(fused, SplitLinear) and fused.out_features == 12
    configure([fused])
    x = torch.randn(3, 64, generator=gen)
    ref = torch.cat([reference(x, p, b) for p, b in zip(parts, bias)], dim=-1)
    assert torch.allclose(fused(x).double(), ref, atol=1e-4)
    same = fused_linear([parts[0], quantize(torch.randn(4, 64, generator=gen), "Q4_1")])
    assert isinstance(same, Linear) and same.out_features == 12


def int8_activation_weights() -> list[tuple[str, QuantizedTensor]]:
    """A weight in every native integer format: byte formats quantized, K-quants (and the GGUF types
    repacked into them) from random blocks with every bit pattern."""
    from test_quant_repack import random_blocks  # noqa: PLC0415 (a sibling test module)

    gen = torch.Generator().manual_seed(5)
    out = [(fmt, quantize(torch.randn(37, 96, generator=gen), fmt)) for fmt in ("Q4_0", "Q4_1", "Q8_0")]
    for fmt in ("Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q5_0", "Q3_K", "IQ4_XS", "IQ4_NL"):
        raw = random_blocks(fmt, seed=len(fmt))
        out.append((fmt, QuantizedTensor.from_gguf_blocks(fmt, raw, (raw.shape[0], 512))))
    return out


@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_activations_are_the_product_of_the_rounded_activations(with_bias: bool, native_kernels) -> None:
    """native_q8 = (x rounded to int8 per 32-block) @ W^T, to fp32 accumulation error, for every
    integer format (the rounding itself: kernels/reference.py, plain torch); native_i8 the same on its
    rows-interleaved repack of Q4_0, Q4_1 and Q8_0."""
    if not native_kernels.has_q8:
        pytest.skip(f"{native_kernels.isa} build: no AVX2")  # the portable build has no int8 path
    from flashdecode.kernels import reference as ref  # noqa: PLC0415

    gen = torch.Generator().manual_seed(6)
    for fmt, w in int8_activation_weights():
        n, k = w.shape
        bias = torch.randn(n, generator=gen) if with_bias else None
        lin = Linear(w, bias)
        names = ["native_q8"] + (["native_i8"] if w.format in I8_FORMATS else [])
        assert set(names) <= set(lin.candidates(allow_approx=True)), fmt
        for name, m in itertools.product(names, MS):
            x = torch.randn(m, k, generator=gen) * 3
            want = ref.linear_q8(x, w.format, w.planes()) + (0 if bias is None else bias.double())
            xq, dx = ref.quantize_activations(x)
            rounded = (xq.double().abs().reshape(m, -1, 32) * dx.double()[..., None]).reshape(m, k)
            scale = rounded @ ref.dequantize(w.format, *w.planes()).double().abs().T
            err = (lin.impl(name)(x).double() - want).abs()
            assert (err <= 1e-5 * scale + 1e-6).all(), f"{fmt} {name} M={m}: {err.max():.3g}"


AMX_FORMATS = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q5_0")  # the int8 products flat_gemm.c runs on tiles


@pytest.mark.parametrize("with_bias", [False, True])
def test_amx_products_are_the_vnni_products_bit_for_bit(with_bias: bool, native_kernels) -> None:
    """On AMX tiles (16 rows and more; a partial tile's rows on VNNI) native_i8 gives VNNI's bits
    exactly, and the product of the rounded activations to fp32 accumulation error; N is not a
    multiple of 16 (a zero-padded group)."""
    if not native_kernels.has_amx:
        pytest.skip(
            f"{native_kernels.isa} build: no AMX-INT8 (the CPU lacks it or the OS refuses its tile state)"
        )
    from flashdecode.kernels import reference as ref  # noqa: PLC0415
    from flashdecode.kernels.cpu import repack_i8  # noqa: PLC0415

    gen = torch.Generator().manual_seed(7)
    was = native_kernels.set_amx()
    try:
        for fmt, w in int8_activation_weights():
            if fmt not in AMX_FORMATS:
                continue
            n, k = w.shape
            assert n % 16, fmt
            bias = torch.randn(n, generator=gen) if with_bias else None
            layouts = [repack_i8(w.format, w.planes())]
            if fmt == "Q4_K":  # the lean repack (its integer sub-scales) and the fp32 one
                layouts.append(repack_i8(w.format, w.planes(), lean=False))
                assert layouts[0][1].dtype == torch.uint8 and layouts[1][1].dtype == torch.float32
            for packed, m in itertools.product(layouts, (16, 17, 40, 512)):
                x = torch.randn(m, k, generator=gen) * 3
                assert native_kernels.set_amx(True)
                y = native_kernels.linear_i8(w.format, x, packed, n, bias)
                assert not native_kernels.set_amx(False)
                assert torch.equal(y, native_kernels.linear_i8(w.format, x, packed, n, bias)), f"{fmt} M={m}"
                want = ref.linear_q8(x, w.format, w.planes()) + (0 if bias is None else bias.double())
                xq, dx = ref.quantize_activations(x)
                rounded = (xq.double().abs().reshape(m, -1, 32) * dx.double()[..., None]).reshape(m, k)
                scale = rounded @ ref.dequantize(w.format, *w.planes()).double().abs().T
                err = (y.double() - want).abs()
                assert (err <= 1e-5 * scale + 1e-6).all(), f"{fmt} M={m}: {err.max():.3g}"
    finally:
        native_kernels.set_amx(was)


def test_a_native_i8_plan_holds_the_weight_once(native_kernels) -> None:
    """Planned on native_i8 alone, a Linear drops its stored planes (the repack holds the same values);
    asked for again, the weight comes back exactly (repack_i8's inverse), and another plan keeps it."""
    if not native_kernels.has_i8:
        pytest.skip(f"{native_kernels.isa} build: no int8-activation kernel")
    gen = torch.Generator().manual_seed(12)
    for fmt, w in int8_activation_weights():
        x = torch.randn(3, w.shape[1], generator=gen)
        lin = Linear(w)
        lin.set_plan([(1, "native_i8")])
        before = lin(x)
        assert lin._weight is None and lin.out_features == w.shape[0] and lin.quantized, fmt
        if fmt == "Q5_0":  # its repack keeps the file's fp16 scales and no mins: 5.5 bits a weight
            assert lin._i8[1].dtype == torch.float16 and lin._i8[2] is None
        if fmt in LEAN:  # the file's two-level scales: about the file's bytes
            assert cpu_kernels.i8_format(w.format, lin._i8) == LEAN[fmt][1], fmt
        for a, b in zip(lin.weight.planes(), w.planes(), strict=True):
            assert (a is None and b is None) or torch.equal(a, b), fmt
        lin.set_plan([(1, "native_i8")])
        assert lin._weight is None and torch.equal(lin(x), before), fmt
        lin.set_plan([(1, "native")])  # the stored planes come back before the repack goes
        assert lin._weight is not None and lin._i8 is None, fmt
        assert torch.allclose(lin(x), x @ lin.weight.dequantize(torch.float32).T, rtol=1e-4, atol=1e-3), fmt


def test_rows_of_a_released_weight_come_from_the_repack(native_kernels) -> None:
    """A tied head's embedding lookup (Linear.rows) on a Linear planned on native_i8 alone reads the
    rows from the repack: the stored weight's rows exactly, and the weight is not rebuilt."""
    if not native_kernels.has_i8:
        pytest.skip(f"{native_kernels.isa} build: no int8-activation kernel")
    for fmt, w in int8_activation_weights():
        lin = Linear(w)
        lin.set_plan([(1, "native_i8")])
        n = w.shape[0]  # rows in the last, zero-padded group of 16 too
        ids = torch.tensor([[0, n - 1, n // 2], [n // 2, 5, n - 2]])
        want = w.dequantize(torch.float32)[ids]
        assert torch.equal(lin.rows(ids, torch.float32), want), fmt
        assert lin._weight is None, fmt
        assert torch.equal(Linear(w).rows(ids, torch.float32), want), fmt  # from the stored planes


# GGUF type -> (its planes' format, the lean repack's kernel format, bytes a weight it reads)
LEAN = {
    "Q6_K": ("Q6_K", "Q6_K_I8", 210 / 256),
    "Q4_K": ("Q4_K", "Q4_K_I8", 148 / 256),
    "Q3_K": ("Q6_K", "Q6_K_I8", 210 / 256),
}


def lean_weight(fmt: str, rows: int = 32) -> QuantizedTensor:
    """A [rows, 512] weight of ``fmt`` from random blocks (every value and sub-scale pattern, scales
    of both signs, zeros and subnormals), rows a multiple of 16 so that no group is padded."""
    from test_quant_repack import random_blocks  # noqa: PLC0415 (a sibling test module)

    parts = [random_blocks(fmt, seed=s) for s in range(-(-rows // 11))]
    w = QuantizedTensor.cat(
        [QuantizedTensor.from_gguf_blocks(fmt, raw, (raw.shape[0], 512)) for raw in parts]
    )
    return w.map_rows(lambda t: t[:rows])


@pytest.mark.parametrize("fmt", sorted(LEAN))
def test_lean_k_quant_repacks_read_about_the_files_bytes(fmt: str) -> None:
    """Q6_K (Q3_K in its planes too) and Q4_K repack with integer sub-scales and fp16 super-scales:
    about the file's bytes a weight (Q6_K's exactly, Q4_K's 6-bit scales as bytes), where the fp32
    layout reads 1.25 and 0.75; unpack_i8 gives back the planes to the bit, dtypes and all."""
    w = lean_weight(fmt)
    planes_fmt, kernel, lean_bytes = LEAN[fmt]
    assert w.format == planes_fmt
    packed = cpu_kernels.repack_i8(w.format, w.planes())
    assert cpu_kernels.i8_format(w.format, packed) == kernel
    assert cpu_kernels.i8_bytes_per_weight(w.format, packed) == lean_bytes
    assert lean_bytes - bytes_per_weight(fmt if fmt != "Q3_K" else "Q6_K") <= 4 / 256
    old = cpu_kernels.repack_i8(w.format, w.planes(), lean=False)
    assert cpu_kernels.i8_format(w.format, old) == w.format
    assert cpu_kernels.i8_bytes_per_weight(w.format, old) == {"Q6_K": 1.25, "Q4_K": 0.75}[w.format]
    for got, want in zip(cpu_kernels.unpack_i8(w.format, packed, w.shape[0]), w.planes(), strict=True):
        assert (got is None and want is None) or (got.dtype == want.dtype and torch.equal(got, want)), fmt
        if got is not None:
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), fmt  # the sign of zero too


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_lean_k_quant_products_are_the_fp32_layouts(isa: str, native_kernels) -> None:
    """On the lean repacks the kernels give the fp32-scale layout's products bit for bit (the same
    integer sums times the same fp32 scales), close to the reference: the avx512 build runs them with
    AVX512-VNNI where the CPU has it, the avx2 build with vpmaddubsw."""
    if isa not in cpu_kernels.supported_builds():
        pytest.skip(f"this CPU cannot run the {isa} build")  # legitimate: the ISA, not a missing build
    from flashdecode.kernels import reference as ref  # noqa: PLC0415

    lib = cpu_kernels.load(isa)
    assert lib is not None and lib.has_i8
    gen = torch.Generator().manual_seed(13)
    for fmt in LEAN:
        w = lean_weight(fmt, rows=37)  # a padded last group
        lean = cpu_kernels.repack_i8(w.format, w.planes())
        old = cpu_kernels.repack_i8(w.format, w.planes(), lean=False)
        assert cpu_kernels.i8_format(w.format, lean) == LEAN[fmt][1]
        for m in MS:
            x = torch.randn(m, w.shape[1], generator=gen) * 3
            y = lib.linear_i8(w.format, x, lean, w.shape[0])
            assert torch.equal(y, lib.linear_i8(w.format, x, old, w.shape[0])), f"{fmt} M={m}"
            want = ref.linear_q8(x, w.format, w.planes())
            assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-4 * float(want.abs().max())), (
                f"{fmt} M={m}"
            )


def test_lean_repacks_fall_back_where_the_file_layout_does_not_hold(native_kernels) -> None:
    """The fp32-scale layout stays where the lean one cannot hold the planes exactly: IQ4_XS's values
    (int8, in Q6_K's planes), a scale that is no fp16 times an integer, rows not in super-blocks of 256."""
    iq4 = lean_weight("IQ4_XS")
    q6, q4 = lean_weight("Q6_K"), lean_weight("Q4_K")
    d = q6.d.clone()
    d[3, 5] = torch.nextafter(d[3, 5], torch.tensor(float("inf")))
    bumped = QuantizedTensor("Q6_K", q6.qs, d)
    for w in (iq4, bumped, q6.columns(0, 4), q4.columns(0, 4), q4.columns(4, 12)):
        packed = cpu_kernels.repack_i8(w.format, w.planes())
        assert cpu_kernels.i8_format(w.format, packed) == w.format
        for got, want in zip(cpu_kernels.unpack_i8(w.format, packed, w.shape[0]), w.planes(), strict=True):
            assert (got is None and want is None) or torch.equal(got, want)


def test_a_tied_head_holds_the_embedding_once(gguf_model, native_kernels) -> None:
    """A tied Q8_0 model with every projection on native_i8 (what numerics="auto" runs) holds each
    GGUF tensor's bytes once (gguf-py's sizes; rope_freqs becomes the RoPE tables): the embedding
    matrix is the head's repack alone, and the lookup reads it there."""
    if not native_kernels.has_i8:
        pytest.skip(f"{native_kernels.isa} build: no int8-activation kernel")
    from flashdecode.engine.numerics import use_int8_activations
    from flashdecode.models.decoder import Decoder
    from flashdecode.models.loader import load_model
    from flashdecode.tools.bench import resident_tensor_bytes

    path = gguf_model("llama3", "Q8_0")
    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    assert "output.weight" not in tensors and "token_embd.weight" in tensors  # tied
    model = Decoder(load_model(str(path)), torch.float32)
    use_int8_activations(model)
    held = resident_tensor_bytes(model) - resident_tensor_bytes(model.rope)
    assert held == sum(n for name, n in tensors.items() if name != "rope_freqs.weight")
    assert model.lm_head._weight is None


def test_an_input_of_the_wrong_width_is_refused() -> None:
    lin = Linear(quantize(torch.randn(32, 64), "Q8_0"))
    configure([lin], "auto")
    with pytest.raises(ValueError, match="input of 96 features"):
        lin(torch.randn(2, 96))
