"""FlashDecoding++'s unified-max softmax (ops/attention.py) against the exact reference, on CPU."""

from __future__ import annotations

import math

import pytest
import torch

from flashdecode.layers import attention as A
from flashdecode.layers.attention import (
    WINDOW_FP16,
    WINDOW_FP32,
    AttentionMetadata,
    PrefillSegment,
    SoftmaxPolicy,
    paged_attention,
)
from flashdecode.layers.kv_cache import KVCache

DECODE_SHAPES = [  # batch, padded length, heads, kv heads, head dim
    (1, 1, 4, 2, 16),
    (3, 37, 9, 3, 64),
    (4, 700, 8, 2, 32),
    (2, 1030, 32, 4, 64),
    (3, 50, 4, 1, 16),
    (2, 33, 4, 4, 8),
]
PREFILL_SHAPES = [  # queries, keys (the queries are the last ones), heads, kv heads, head dim
    (1, 1, 4, 2, 16),
    (7, 7, 4, 2, 16),
    (70, 70, 9, 3, 64),
    (30, 600, 8, 2, 32),
    (300, 333, 4, 4, 16),
    (1, 90, 6, 2, 16),
]


def decode_inputs(b, length, h, kvh, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, d, generator=g)
    k = torch.randn(b, length, kvh, d, generator=g)
    v = torch.randn(b, length, kvh, d, generator=g)
    lens = torch.randint(1, length + 1, (b,), generator=g)
    lens[0] = length
    for i in range(b):  # padding holds whatever the cache held, NaN included
        k[i, lens[i] :] = float("nan")
        v[i, lens[i] :] = float("nan")
    return q.to(dtype), k.to(dtype), v.to(dtype), lens


def key_major(x: torch.Tensor) -> torch.Tensor:
    """The layout ``gather_decode`` produces: [B, L, KVH, D] views of [L, B, KVH, D] storage."""
    return x.transpose(0, 1).contiguous().transpose(0, 1)


def exact64(q, k, v, lens, scale):
    """The oracle for extreme logits: the exact softmax in float64."""
    b, h, d = q.shape
    g = h // k.shape[2]
    out = torch.empty(b, h, d, dtype=torch.float64)
    for i in range(b):
        n = int(lens[i])
        for j in range(h):
            s = (q[i, j].double() * scale) @ k[i, :n, j // g].double().T
            out[i, j] = torch.softmax(s, -1) @ v[i, :n, j // g].double()
    return out


@pytest.mark.parametrize("shape", DECODE_SHAPES)
@pytest.mark.parametrize("layout", ["key-major", "contiguous"])
def test_decode_unified_equals_exact(shape, layout) -> None:
    q, k, v, lens = decode_inputs(*shape)
    scale = shape[-1] ** -0.5
    ref = A.decode_attention_exact(q, k, v, lens, scale)
    if layout == "key-major":
        k, v = key_major(k), key_major(v)
    for phi in (0.0, 2.5, -3.0):
        out, fallback = A.decode_attention_unified(q, k, v.clone(), lens, scale, phi)
        assert not fallback.any()
        assert (out - ref).abs().max() < 1e-5
    assert (
        A.decode_attention_splitk(q, k, v.clone(), lens, scale, partition_size=16) - ref
    ).abs().max() < 1e-5
    assert (A.decode_attention_softmax(q, k, v.clone(), lens, scale) - ref).abs().max() < 1e-5


@pytest.mark.parametrize("shape", PREFILL_SHAPES)
def test_prefill_unified_equals_exact(shape) -> None:
    n, length, h, kvh, d = shape
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(*s, generator=g) for s in ((n, h, d), (length, kvh, d), (length, kvh, d)))
    scale = d**-0.5
    ref = A.prefill_attention_exact(q, k, v, scale)
    for phi in (0.0, 1.5):
        out, fallback = A.prefill_attention_unified(q, k, v, scale, phi, block_q=32, block_k=64)
        assert fallback.shape == (n, h) and not fallback.any()
        assert (out - ref).abs().max() < 1e-5
    out, _ = A.prefill_attention_unified(q, k, v, scale, 0.0)  # default blocks
    assert (out - ref).abs().max() < 1e-5
    assert (A.prefill_attention_online(q, k, v, scale, block_q=32, block_k=64) - ref).abs().max() < 1e-5


def test_bf16_within_its_rounding() -> None:
    q, k, v, lens = decode_inputs(3, 200, 8, 2, 64, dtype=torch.bfloat16)
    ref = A.decode_attention_exact(q, k, v, lens, 0.125)
    out, fallback = A.decode_attention_unified(q, key_major(k), key_major(v), lens, 0.125, 0.0)
    assert out.dtype == torch.bfloat16 and not fallback.any()
    torch.testing.assert_close(out, ref, rtol=1.6e-2, atol=1e-2)  # bf16: 8 significant bits
    assert ((out.float() - ref.float()).abs() > 0).float().mean() < 0.05  # almost all bit-identical

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(*s, generator=g).bfloat16() for s in ((40, 8, 64), (90, 2, 64), (90, 2, 64)))
    ref = A.prefill_attention_exact(q, k, v, 0.125)
    out, _ = A.prefill_attention_unified(q, k, v, 0.125, 0.0)
    torch.testing.assert_close(out, ref, rtol=1.6e-2, atol=1e-2)


def test_window_check_catches_overflow_underflow_and_nan() -> None:
    n = torch.tensor([10.0, 10.0, 10.0, 10.0, 10.0, 1.0])
    lo, hi = WINDOW_FP32
    lsum = torch.tensor([1.0, math.exp(hi) * 2, 10 * math.exp(lo) / 2, float("inf"), float("nan"), 1.0])
    assert A.window_ok(lsum, n, WINDOW_FP32).tolist() == [True, False, False, False, False, True]


def test_rows_far_outside_the_window_fall_back_and_stay_exact() -> None:
    b, length, h, kvh, d = 3, 300, 8, 2, 32
    q, k, v, lens = decode_inputs(b, length, h, kvh, d, seed=3)
    scale = d**-0.5
    ref = A.decode_attention_exact(q, k, v, lens, scale)
    # a phi far from every logit sends every row to the exact path, still exact
    out, fallback = A.decode_attention_unified(q, k, v.clone(), lens, scale, -75.0)
    assert fallback.all()
    assert (out - ref).abs().max() < 1e-5
    # against the fp16 window [-9, 11] at phi = 0: a hot row (logits up to ~+25) and a cold kv group
    # (every logit near -25); the other rows sit inside the window
    q[0, 1] *= 8.0
    q[1, 4:8, 0] = 12.0  # kv head 1 of sequence 1
    k[1, : lens[1], 1, 0] = -12.0
    ref = A.decode_attention_exact(q, k, v, lens, scale)
    expected = torch.zeros(b, h, dtype=torch.bool)
    expected[0, 1] = True
    expected[1, 4:8] = True
    out, fallback = A.decode_attention_unified(q, key_major(k), key_major(v), lens, scale, 0.0, WINDOW_FP16)
    assert torch.equal(fallback, expected)
    assert (out - ref).abs().max() < 1e-5
    # logits in the hundreds overflow exp in fp32 at phi = 0: caught by the fp32 window
    q[2, 0] *= 60.0
    out, fallback = A.decode_attention_unified(q, k, v.clone(), lens, scale, 0.0)
    assert fallback[2, 0] and fallback.sum() == 1
    assert (out.double() - exact64(q, k, v, lens, scale)).abs().max() < 1e-4  # fp32 rounds at ~1e-5 here


def test_prefill_rows_outside_the_window_fall_back_and_stay_exact() -> None:
    n, length, h, kvh, d = 50, 80, 4, 2, 16
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(*s, generator=g) for s in ((n, h, d), (length, kvh, d), (length, kvh, d)))
    q[10, 2] *= 8.0  # logits up to ~+25
    ref = A.prefill_attention_exact(q, k, v, d**-0.5)
    out, fallback = A.prefill_attention_unified(q, k, v, d**-0.5, 2.0, WINDOW_FP16, 16, 32)
    assert fallback[10, 2] and fallback.sum() == 1
    assert (out - ref).abs().max() < 1e-5
    # phi = 10: the fp16 window's lower bound rejects the rows whose logits are flat
    out, fallback = A.prefill_attention_unified(q, k, v, d**-0.5, 10.0, WINDOW_FP16, 16, 32)
    assert 1 < fallback.sum() < fallback.numel()
    assert (out - ref).abs().max() < 1e-5
    q[20, 1] *= 80.0  # logits in the hundreds: fp32 overflow at phi = 0
    out, fallback = A.prefill_attention_unified(q, k, v, d**-0.5, 0.0, block_q=16, block_k=32)
    assert fallback[20, 1] and fallback.sum() == 1
    ref64 = A.prefill_attention_exact(q.double(), k.double(), v.double(), d**-0.5)
    assert (out.double() - ref64).abs().max() < 1e-4


def test_recompute_helpers_are_exact() -> None:
    q, k, v, lens = decode_inputs(3, 40, 6, 3, 16, seed=5)
    ref = A.decode_attention_exact(q, k, v, lens, 0.25)
    out = torch.zeros_like(ref)
    A.recompute_decode_rows(out, torch.ones(3, 6, dtype=torch.bool), q, k, v, lens, 0.25)
    assert (out - ref).abs().max() < 1e-5
    qp, kp, vp = torch.randn(9, 6, 16), torch.randn(20, 3, 16), torch.randn(20, 3, 16)
    ref = A.prefill_attention_exact(qp, kp, vp, 0.25)
    out = torch.zeros_like(ref)
    A.recompute_prefill_rows(out, torch.ones(9, 6, dtype=torch.bool), qp, kp, vp, 0.25)
    assert (out - ref).abs().max() < 1e-5


def test_row_lse_statistics_are_exact() -> None:
    q, k, _, lens = decode_inputs(2, 30, 4, 2, 16, seed=6)
    lse = A.decode_row_lse(q, k, lens, 0.25)
    for i in range(2):
        for j in range(4):
            s = (q[i, j] * 0.25) @ k[i, : lens[i], j // 2].T
            assert abs(lse[i, j] - torch.logsumexp(s, -1)) < 1e-5
    qp, kp = torch.randn(5, 4, 16), torch.randn(12, 2, 16)
    lse = A.prefill_row_lse(qp, kp, 0.25)
    for i in range(5):
        s = (qp[i, 3] * 0.25) @ kp[: 12 - 5 + i + 1, 1].T
        assert abs(lse[i, 3] - torch.logsumexp(s, -1)) < 1e-5


def test_policy_validation() -> None:
    with pytest.raises(ValueError):
        SoftmaxPolicy("fast")
    with pytest.raises(ValueError):
        SoftmaxPolicy("unified", phi=(float("nan"),))
    with pytest.raises(ValueError):
        SoftmaxPolicy("unified", phi=1e3)
    with pytest.raises(ValueError):
        SoftmaxPolicy("unified", window=(1.0, -1.0))
    p = SoftmaxPolicy("unified", phi=[1.0, 2.0, 3.0])
    assert p.phi_at(2) == 3.0 and SoftmaxPolicy("unified", phi=4.0).phi_at(7) == 4.0
    assert p.window_for(torch.float16) == WINDOW_FP16 and p.window_for(torch.float32) == WINDOW_FP32


def paged_step(kv_cache_dtype: str = "auto", seed: int = 7):
    """A cache holding three sequences and a step with two decodes and two prefill chunks (one with
    a cached prefix), laid out in shuffled 4-slot blocks."""
    g = torch.Generator().manual_seed(seed)
    layers, kvh, d, h, bs = 2, 2, 16, 6, 4
    cache = KVCache(layers, 64 * bs, kvh, d, torch.float32, kv_cache_dtype)
    blocks = torch.randperm(64, generator=g)
    lengths = {"d0": 13, "d1": 6, "p0": 9, "p1": 22}
    tables, start = {}, 0
    for name, n in lengths.items():
        nb = -(-n // bs)
        tables[name] = blocks[start : start + nb]
        start += nb

    def slots(name, n):
        pos = torch.arange(n)
        return tables[name][pos // bs] * bs + pos % bs

    for layer in range(layers):
        for name, n in lengths.items():
            s = slots(name, n)
            cache.write(layer, s, torch.randn(n, kvh, d, generator=g), torch.randn(n, kvh, d, generator=g))
    decode_slots = torch.zeros(2, 13, dtype=torch.long)
    decode_slots[0] = slots("d0", 13)
    decode_slots[1, :6] = slots("d1", 6)
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long),
        num_decode=2,
        decode_slots=decode_slots,
        decode_context_lens=torch.tensor([13, 6]),
        prefills=[
            PrefillSegment(start=2, num_query=9, context_len=9, slots=slots("p0", 9)),
            PrefillSegment(start=11, num_query=5, context_len=22, slots=slots("p1", 22)),  # cached prefix
        ],
    )
    q = torch.randn(16, h, d, generator=g)
    return q, cache, meta


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_paged_attention_unified_equals_exact_and_counts(kv_cache_dtype) -> None:
    q, cache, meta = paged_step(kv_cache_dtype)
    for layer in range(2):
        ref = paged_attention(q, cache, layer, meta, 0.25)
        assert torch.equal(ref, paged_attention(q, cache, layer, meta, 0.25, SoftmaxPolicy("exact")))
        policy = SoftmaxPolicy("unified", phi=(0.5, -1.0), backend="torch")
        out = paged_attention(q, cache, layer, meta, 0.25, policy)
        assert (out - ref).abs().max() < 1e-5
        assert policy.rows_checked == 16 * 6 and policy.fallbacks == 0
        # the fp16 window at a far phi: every row falls back, counted, still exact
        policy = SoftmaxPolicy("unified", phi=20.0, window=WINDOW_FP16, backend="torch")
        out = paged_attention(q, cache, layer, meta, 0.25, policy)
        assert (out - ref).abs().max() < 1e-5
        assert policy.fallbacks == policy.rows_checked == 16 * 6


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_gather_decode_needs_no_copy(kv_cache_dtype) -> None:
    """The key-major gather makes every (sequence, kv head) pair one slice of a strided batch."""
    _, cache, meta = paged_step(kv_cache_dtype)
    # clones: a gather's result is a scratch view that the next gather overwrites
    k, v = (t.clone() for t in A.gather_decode(cache, 0, meta.decode_slots, torch.float32))
    ref_k, ref_v = cache.gather(0, meta.decode_slots, torch.float32)
    assert torch.equal(k, ref_k) and torch.equal(v, ref_v)
    assert A._pairs(k).data_ptr() == k.data_ptr() and A._pairs(v).data_ptr() == v.data_ptr()
    assert torch.equal(A._pairs(k)[3], ref_k[1, :, 1])  # pair 3 = sequence 1, kv head 1


def test_observer_sees_every_row() -> None:
    q, cache, meta = paged_step()
    seen = []
    policy = SoftmaxPolicy("exact", observer=lambda layer, lse, n: seen.append((layer, lse, n)))
    out = paged_attention(q, cache, 1, meta, 0.25, policy)
    assert torch.equal(out, paged_attention(q, cache, 1, meta, 0.25))
    assert sum(lse.numel() for _, lse, _ in seen) == 16 * 6
    assert all(layer == 1 and lse.shape == n.shape for layer, lse, n in seen)
    assert seen[0][2][:, 0].tolist() == [13, 6]  # decode rows: their context lengths
    assert seen[2][2][:, 0].tolist() == list(range(18, 23))  # the chunk with a cached prefix
