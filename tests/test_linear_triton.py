"""The Triton flat GEMM (ops/triton/flat_gemm.py) under the interpreter, against x @ dequant(W)^T."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("triton was imported without the interpreter and there is no GPU", allow_module_level=True)

from model_factory import random_k_blocks  # noqa: E402

from flashdecode.kernels.triton.flat_gemm import flat_gemm  # noqa: E402
from flashdecode.layers.quant import QuantizedTensor, quantize  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def reference(x, w, bias):
    wd = w._dequant_torch() if hasattr(w, "qs") else w.float()
    y = x.double() @ wd.double().T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0", "F32", "BF16"])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 37, 96), (5, 64, 64), (16, 130, 160), (17, 3, 32)])
def test_flat_gemm_matches_the_reference(fmt: str, m: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n)
    w = torch.randn(n, k, generator=gen) * 0.5
    if fmt == "F32":
        weight = w
    elif fmt == "BF16":
        weight = w.bfloat16()
    else:
        weight = quantize(w, fmt)
    x = torch.randn(m, k, generator=gen)
    if fmt == "BF16":
        x = x.bfloat16()
    bias = torch.randn(n, generator=gen) if m % 2 else None
    y = flat_gemm(x, weight, bias, block_n=32, block_k=32 if k % 64 else 64)
    assert y.shape == (m, n) and y.dtype == x.dtype
    ref = reference(x, weight, bias)
    tol = 2e-2 if fmt == "BF16" else 1e-4
    scale = (
        x.double().abs()
        @ (weight._dequant_torch() if hasattr(weight, "qs") else weight.float()).abs().double().T
    )
    assert ((y.double() - ref).abs() <= tol * scale + 1e-4).all()


def test_odd_k_for_float_weights() -> None:
    gen = torch.Generator().manual_seed(3)
    w, x = torch.randn(9, 45, generator=gen), torch.randn(3, 45, generator=gen)
    y = flat_gemm(x, w, block_n=16, block_k=32)
    assert torch.allclose(y.double(), reference(x, w, None), atol=1e-4)
    with pytest.raises(ValueError):
        flat_gemm(x, torch.randn(9, 44))


@pytest.mark.parametrize("fmt", ["Q4_K", "Q5_K", "Q6_K", "Q2_K"])
@pytest.mark.parametrize("m", [1, 17])
def test_k_quants_match_the_reference(fmt: str, m: int) -> None:
    gen = torch.Generator().manual_seed(m)
    weight = QuantizedTensor.from_gguf_blocks(fmt, random_k_blocks(fmt, 37, 512, seed=m), (37, 512))
    x = torch.randn(m, 512, generator=gen)
    y = flat_gemm(x, weight, block_n=32, block_k=64)
    wd = weight._dequant_torch().double()
    assert (
        (y.double() - reference(x, weight, None)).abs() <= 1e-4 * (x.double().abs() @ wd.abs().T) + 1e-4
    ).all()
