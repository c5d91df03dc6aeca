"""Triton attention kernels: FlashDecoding++'s asynchronized softmax with a unified max value
(Hong et al., MLSys 2024, section 3), and the synchronised kernels it replaces.

**Decode** (one query per sequence) is split over the keys (Flash-Decoding's split-KV): program
(b, kv head, partition) computes, for the G query heads sharing the kv head, the partial
``acc_p = sum_j exp(x_j - phi) v_j`` and ``l_p = sum_j exp(x_j - phi)`` over its partition. With a
unified phi the reduce step simply adds the partials and divides once; no partition waits for
another's max. ``unified=False`` builds the synchronised baseline from the same code: each partition
keeps its running max and rescales as it goes, and the reduce rescales every partial by
exp(m_p - max_p m_p) before adding.

**Prefill** (causal, a chunk of N queries at the end of L keys): program (query block, head) walks
the key blocks up to the diagonal, adding exp(S - phi) V and rowsum(exp(S - phi)) to its
accumulators, with no running max and no rescaling (``unified=False``: FlashAttention-2's online
softmax).

Both return the output and the unified row sums ``l`` (float32) so that the caller checks the safe
window (``layers.attention.window_ok``) and recomputes the rows that left it; the probabilities are fed
to the PV dot in the inputs' dtype, so for fp16 inputs use ``layers.attention.WINDOW_FP16``.
Accumulation is in fp32; fp32 inputs use IEEE dots (no TF32).

K and V arrive gathered (``KVCache.gather``; any strides), as the KV cache owns its storage format.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

DECODE_PARTITION = 256  # keys per split-KV partition
DECODE_BLOCK_N = 64  # keys per inner tile
PREFILL_BLOCK_M = 64
PREFILL_BLOCK_N = 64


@triton.jit
def _decode_partials(
    Q,
    K,
    V,
    LENS,
    ACC,
    LSUM,
    MAX,
    scale,
    phi,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kl,
    stride_kh,
    stride_vb,
    stride_vl,
    stride_vh,
    G: tl.constexpr,
    D: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    NUM_PARTS: tl.constexpr,
    PARTITION: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UNIFIED: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    b = tl.program_id(0)
    kh = tl.program_id(1)
    part = tl.program_id(2)
    length = tl.load(LENS + b)
    start = part * PARTITION
    end = tl.minimum(start + PARTITION, length)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kh * G + offs_g
    gmask = offs_g < G
    dmask = offs_d < D
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=gmask[:, None] & dmask[None, :],
        other=0.0,
    )
    if DOT_F32:
        q = q.to(tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    lsum = tl.zeros([BLOCK_G], dtype=tl.float32)
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + offs_n
        nmask = offs < end
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(
            K + b * stride_kb + offs[:, None] * stride_kl + kh * stride_kh + offs_d[None, :], kv_mask, 0.0
        )
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(nmask[None, :], s, float("-inf"))
        if UNIFIED:
            p = tl.exp(s - phi)
        else:
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            lsum = lsum * alpha
            acc = acc * alpha[:, None]
            m = m_new
        lsum += tl.sum(p, 1)
        v = tl.load(
            V + b * stride_vb + offs[:, None] * stride_vl + kh * stride_vh + offs_d[None, :], kv_mask, 0.0
        )
        p = p.to(v.dtype)  # the probabilities enter the PV dot in the inputs' dtype
        if DOT_F32:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc += tl.dot(p, v, input_precision=PRECISION)

    # partials: [B, H, P, D] and [B, H, P], contiguous
    row = (b * NUM_HEADS + heads) * NUM_PARTS + part
    tl.store(ACC + row[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None] & dmask[None, :])
    tl.store(LSUM + row, lsum, mask=gmask)
    if not UNIFIED:
        tl.store(MAX + row, m, mask=gmask)


@triton.jit
def _decode_reduce(
    ACC,
    LSUM,
    MAX,
    OUT,
    LOUT,
    stride_ob,
    stride_oh,
    D: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    NUM_PARTS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UNIFIED: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    pmask = offs_p < NUM_PARTS
    dmask = offs_d < D
    row = (b * NUM_HEADS + h) * NUM_PARTS + offs_p
    acc = tl.load(ACC + row[:, None] * D + offs_d[None, :], mask=pmask[:, None] & dmask[None, :], other=0.0)
    lsum = tl.load(LSUM + row, mask=pmask, other=0.0)
    if UNIFIED:
        total = tl.sum(lsum, 0)  # the partials are simply added
        out = tl.sum(acc, 0) / total
    else:
        m = tl.load(MAX + row, mask=pmask, other=float("-inf"))
        w = tl.exp(m - tl.max(m, 0))  # the synchronisation: rescale each partial to the global max
        w = tl.where(m == float("-inf"), 0.0, w)
        total = tl.sum(lsum * w, 0)
        out = tl.sum(acc * w[:, None], 0) / total
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty), mask=dmask)
    tl.store(LOUT + b * NUM_HEADS + h, total)


@triton.jit
def _prefill(
    Q,
    K,
    V,
    OUT,
    LOUT,
    scale,
    phi,
    N,
    L,
    stride_qn,
    stride_qh,
    stride_kl,
    stride_kh,
    stride_vl,
    stride_vh,
    stride_on,
    stride_oh,
    G: tl.constexpr,
    D: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UNIFIED: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    qb = tl.program_id(0)
    h = tl.program_id(1)
    kh = h // G
    offset = L - N
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mmask = offs_m < N
    dmask = offs_d < D
    pos = offset + offs_m  # absolute position of each query: it sees keys 0..pos
    q = tl.load(
        Q + offs_m[:, None] * stride_qn + h * stride_qh + offs_d[None, :],
        mask=mmask[:, None] & dmask[None, :],
        other=0.0,
    )
    if DOT_F32:
        q = q.to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    visible = tl.minimum(offset + (qb + 1) * BLOCK_M, L)
    for n0 in range(0, visible, BLOCK_N):
        offs = n0 + offs_n
        nmask = offs < L
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(K + offs[:, None] * stride_kl + kh * stride_kh + offs_d[None, :], kv_mask, 0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where((offs[None, :] <= pos[:, None]) & nmask[None, :], s, float("-inf"))
        if UNIFIED:
            p = tl.exp(s - phi)
        else:
            m_new = tl.maximum(m, tl.max(s, 1))
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past N see nothing
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            lsum = lsum * alpha
            acc = acc * alpha[:, None]
            m = m_new
        lsum += tl.sum(p, 1)
        v = tl.load(V + offs[:, None] * stride_vl + kh * stride_vh + offs_d[None, :], kv_mask, 0.0)
        p = p.to(v.dtype)  # the probabilities enter the PV dot in the inputs' dtype
        if DOT_F32:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc += tl.dot(p, v, input_precision=PRECISION)
    out = acc / lsum[:, None]
    tl.store(
        OUT + offs_m[:, None] * stride_on + h * stride_oh + offs_d[None, :],
        out.to(OUT.dtype.element_ty),
        mask=mmask[:, None] & dmask[None, :],
    )
    tl.store(LOUT + offs_m * NUM_HEADS + h, lsum, mask=mmask)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 or _dot_f32(dtype) else "tf32"  # only fp32 operands read it


def _dot_f32(dtype: torch.dtype) -> bool:
    """Upcast bf16 dot operands to fp32: only under the interpreter, whose tl.dot multiplies bf16 bit
    patterns (triton-lang/triton#11584). Operands are rounded to bf16 first, as on a GPU."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def decode_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    phi: float | None,
    partition_size: int = DECODE_PARTITION,
    block_n: int = DECODE_BLOCK_N,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV decode. q: [B, H, D]; k, v: [B, L, KVH, D] (any strides, last dim contiguous);
    context_lens: [B]. ``phi`` a float: unified max (partials added); None: the synchronised
    split-K. Returns (out [B, H, D] in q's dtype, l [B, H] float32: the unified row sums, or the
    sums relative to the row max when ``phi`` is None)."""
    b, h, d = q.shape
    length, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    parts = max(1, triton.cdiv(length, partition_size))
    acc = torch.empty(b, h, parts, d, dtype=torch.float32, device=q.device)
    lsum = torch.empty(b, h, parts, dtype=torch.float32, device=q.device)
    mx = torch.empty_like(lsum) if phi is None else lsum  # unused by the unified kernels
    lens = context_lens.to(device=q.device, dtype=torch.int32)
    unified = phi is not None
    _decode_partials[(b, kvh, parts)](
        q, k, v, lens, acc, lsum, mx, scale, phi if unified else 0.0,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        G=g, D=d, NUM_HEADS=h, NUM_PARTS=parts, PARTITION=partition_size, BLOCK_G=_pow2(g),
        BLOCK_D=_pow2(d), BLOCK_N=block_n, UNIFIED=unified, PRECISION=_precision(q.dtype),
        DOT_F32=_dot_f32(q.dtype),
    )  # fmt: skip
    out = torch.empty_like(q)
    lout = torch.empty(b, h, dtype=torch.float32, device=q.device)
    _decode_reduce[(b, h)](
        acc, lsum, mx, out, lout, out.stride(0), out.stride(1),
        D=d, NUM_HEADS=h, NUM_PARTS=parts, BLOCK_P=_pow2(parts, 1), BLOCK_D=_pow2(d), UNIFIED=unified,
    )  # fmt: skip
    return out, lout


def prefill_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    phi: float | None,
    block_m: int = PREFILL_BLOCK_M,
    block_n: int = PREFILL_BLOCK_N,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal prefill of the last N of L positions. q: [N, H, D]; k, v: [L, KVH, D]. ``phi`` a
    float: unified max; None: online softmax. Returns (out [N, H, D] in q's dtype, l [N, H] float32
    as in ``decode_attention_triton``)."""
    n, h, d = q.shape
    length, kvh = k.shape[0], k.shape[1]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty_like(q)
    lout = torch.empty(n, h, dtype=torch.float32, device=q.device)
    unified = phi is not None
    _prefill[(triton.cdiv(n, block_m), h)](
        q, k, v, out, lout, scale, phi if unified else 0.0, n, length,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        G=h // kvh, D=d, NUM_HEADS=h, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_pow2(d),
        UNIFIED=unified, PRECISION=_precision(q.dtype), DOT_F32=_dot_f32(q.dtype),
    )  # fmt: skip
    return out, lout
