"""GGUF types without a kernel of their own, repacked at load into a native layout that holds them
exactly (kernels/formats.py ``REPACKED_INTO``): checked against the ``gguf`` package's dequantization
of the same bytes, through the torch reference, the C kernels and an engine run against transformers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from flashdecode.kernels.formats import LOADED_NATIVE, NATIVE_FORMATS, REPACKED_INTO
from flashdecode.layers.dataflow import configure
from flashdecode.layers.linear import Linear
from flashdecode.layers.quant import QuantizedTensor

N, K = 11, 512


def random_blocks(fmt: str, seed: int) -> np.ndarray:
    """Random bytes (every value, sub-scale and high-bit pattern occurs) with finite fp16 scales of
    both signs, zeros and subnormals among them, where each type keeps its scales."""
    rng = np.random.default_rng(seed)
    elements, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[fmt]]
    raw = rng.integers(0, 256, size=(N * K // elements, size), dtype=np.uint8)
    # d first, but Q3_K's and Q6_K's is last and Q2_K ends with d, dmin
    fields = {"Q3_K": [size - 2], "Q6_K": [size - 2], "Q2_K": [size - 4, size - 2], "Q5_1": [0, 2]}.get(
        fmt, [0]
    )
    for i, at in enumerate(fields):
        scales = rng.standard_normal(raw.shape[0]).astype(np.float16)
        scales[:: 7 + i] = np.float16(3e-6)  # subnormal
        scales[:: 11 + i] = 0.0
        raw[:, at : at + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw.reshape(N, -1)


def gguf_reference(fmt: str, raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(dequantize(raw, gguf.GGMLQuantizationType[fmt]).reshape(N, K).copy())


def same_values(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Equal to the bit, but for the sign of zero: Q5_0's d * (q - 16) is d * q - 16 d in its layout,
    +0 where gguf gives -0 for a negative d (no product or sum can tell them apart)."""
    return torch.equal(got, ref) and torch.equal(
        got.view(torch.int32)[ref != 0], ref.view(torch.int32)[ref != 0]
    )


@pytest.mark.parametrize("fmt", sorted(REPACKED_INTO))
def test_repacked_values_are_gguf_values(fmt: str, native_kernels) -> None:
    raw = random_blocks(fmt, seed=len(fmt))
    ref = gguf_reference(fmt, raw)
    qt = QuantizedTensor.from_gguf_blocks(fmt, raw, (N, K))
    assert qt.format == REPACKED_INTO[fmt]
    assert same_values(qt.dequantize(), ref)  # the C dequantizer
    assert same_values(qt._dequant_torch(), ref)  # the plain-torch reference
    ids = torch.tensor([[3, 0], [10, 3]])
    assert same_values(qt.rows(ids).reshape(-1, K), ref[ids.reshape(-1)])  # embedding lookups
    if fmt != "Q5_0":  # every other type is bit-identical, zeros included
        assert torch.equal(qt.dequantize().view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("fmt", sorted(REPACKED_INTO))
def test_repacked_products_match_the_reference(fmt: str, native_kernels) -> None:
    raw = random_blocks(fmt, seed=7)
    ref = gguf_reference(fmt, raw).double()
    gen = torch.Generator().manual_seed(0)
    lin = Linear(QuantizedTensor.from_gguf_blocks(fmt, raw, (N, K)), torch.randn(N, generator=gen))
    configure([lin])
    assert lin.plan == [(1, "native")]
    for m in (1, 5, 13):
        x = torch.randn(m, K, generator=gen)
        want = x.double() @ ref.T + lin.bias.double()
        bound = 1e-5 * (x.double().abs() @ ref.abs().T) + 1e-5
        assert ((lin(x).double() - want).abs() <= bound).all(), (fmt, m)


def test_every_common_gguf_type_loads_natively(native_kernels) -> None:
    """Issue 15's list of the types common GGUF files carry: each loads into a native layout."""
    common = "Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K IQ4_NL IQ4_XS".split()
    assert set(common) <= set(LOADED_NATIVE)
    for fmt in common:
        qt = QuantizedTensor.from_gguf_blocks(fmt, random_blocks(fmt, seed=1), (N, K))
        assert qt.format in NATIVE_FORMATS, fmt
        # what the tuner times: the flat GEMM, and int8 activations on the rows-interleaved repack
        tuned = {"native"} | ({"native_i8"} if native_kernels.has_i8 else set())
        assert tuned <= set(Linear(qt).candidates(allow_approx=True)), fmt
    with pytest.raises(ValueError, match="no native kernel"):
        QuantizedTensor.from_gguf_blocks("Q8_1", np.zeros((1, 40), np.uint8), (1, 32))


def test_bad_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="bytes for a"):
        QuantizedTensor.from_gguf_blocks("Q5_0", np.zeros((N, 10), np.uint8), (N, K))


@pytest.mark.parametrize("tensor_type", ["Q5_0", "Q5_1"])
def test_q5_gguf_runs_natively_and_matches_transformers(
    tensor_type: str, gguf_model: Callable[..., Path], native_kernels
) -> None:
    """A Q5_0 / Q5_1 GGUF (gguf-py's encoders) runs on the Q5_K kernel and matches transformers
    running the same file (which dequantizes every tensor with gguf-py)."""
    from test_hf_parity import run_parity
    from transformers import AutoModelForCausalLM

    from flashdecode.models.loader import load_model

    path = gguf_model("llama", tensor_type)
    weights = load_model(path).weights
    assert isinstance(weights["layers.0.down"], QuantizedTensor)
    assert weights["layers.0.down"].format == "Q5_K"
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    run_parity(path, ref, f"llama gguf {tensor_type}")
