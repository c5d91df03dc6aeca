"""The Triton attention kernels (ops/triton/attention.py) under the interpreter, against the reference.

TRITON_INTERPRET=1 must be set before triton is first imported; this module sets it at import time,
before it imports the kernels.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from flashdecode.kernels.triton.attention import decode_attention_triton, prefill_attention_triton  # noqa: E402
from flashdecode.layers import attention as A  # noqa: E402
from flashdecode.layers.attention import WINDOW_FP16, SoftmaxPolicy, paged_attention  # noqa: E402

# fp32: float rounding; fp16/bf16: the probabilities enter the PV dot rounded to the input dtype
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2}


def decode_inputs(b, length, h, kvh, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, d, generator=g)
    k = torch.randn(b, length, kvh, d, generator=g)
    v = torch.randn(b, length, kvh, d, generator=g)
    lens = torch.randint(1, length + 1, (b,), generator=g)
    lens[0] = length
    for i in range(b):
        k[i, lens[i] :] = float("nan")
        v[i, lens[i] :] = float("nan")
    return q, k, v, lens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 4, 2, 16), (3, 75, 9, 3, 64), (2, 300, 8, 2, 32)])
def test_decode_kernel_matches_reference(dtype, shape) -> None:
    q, k, v, lens = decode_inputs(*shape)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = shape[-1] ** -0.5
    ref = A.decode_attention_exact(q, k, v, lens, scale).float()  # fp32 math on the same inputs
    for phi in (0.5, None):  # unified max; synchronised split-K
        out, lsum = decode_attention_triton(q, k, v, lens, scale, phi, partition_size=64, block_n=32)
        assert out.dtype == dtype and lsum.shape == shape[:1] + shape[2:3]
        assert (out.float() - ref).abs().max() < TOLERANCE[dtype]
    # the unified row sums are sum exp(x - phi): they certify the window as on the CPU path
    _, lsum = decode_attention_triton(q, k, v, lens, scale, 0.5, partition_size=64, block_n=32)
    lse = A.decode_row_lse(q.float(), k.float(), lens, scale)
    assert torch.allclose(lsum.log(), lse - 0.5, atol=1e-2 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 4, 2, 16), (20, 20, 6, 3, 64), (9, 40, 4, 1, 16)])
def test_prefill_kernel_matches_reference(dtype, shape) -> None:
    n, length, h, kvh, d = shape
    g = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(*s, generator=g).to(dtype) for s in ((n, h, d), (length, kvh, d), (length, kvh, d))
    )
    ref = A.prefill_attention_exact(q.float(), k.float(), v.float(), d**-0.5)
    for phi in (0.5, None):  # unified max; online softmax
        out, lsum = prefill_attention_triton(q, k, v, d**-0.5, phi, block_m=16, block_n=16)
        assert out.dtype == dtype and lsum.shape == (n, h)
        assert (out.float() - ref).abs().max() < TOLERANCE[dtype]


def test_unified_partials_are_added_not_rescaled() -> None:
    """Partitions of one row run as separate programs; their unified partials add up exactly."""
    q, k, v, lens = decode_inputs(2, 200, 4, 2, 16, seed=2)
    one, l_one = decode_attention_triton(q, k, v, lens, 0.25, 1.0, partition_size=256, block_n=32)
    many, l_many = decode_attention_triton(q, k, v, lens, 0.25, 1.0, partition_size=32, block_n=32)
    assert (one - many).abs().max() < 1e-6
    assert torch.allclose(l_one, l_many, rtol=1e-6)


def test_paged_attention_through_triton_with_fallbacks() -> None:
    from test_attention import paged_step

    q, cache, meta = paged_step()
    q[0, 1] *= 8.0  # a decode row and a prefill row far outside the fp16 window at phi = 0
    q[12, 3] *= 8.0
    for layer in range(2):
        ref = paged_attention(q, cache, layer, meta, 0.25)
        policy = SoftmaxPolicy("unified", phi=0.0, window=WINDOW_FP16, backend="triton")
        out = paged_attention(q, cache, layer, meta, 0.25, policy)
        assert (out - ref).abs().max() < 1e-5
        assert policy.rows_checked == 16 * 6 and policy.fallbacks >= 2
