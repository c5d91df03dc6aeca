"""Triton flat GEMM (FlashDecoding++ section 4): y[M, N] = x[M, K] W[N, K]^T for the small M of decoding.

Stock GEMMs tile M by 64 or 128, so at M = 1..16 most of every tile is padding. Here M is padded only
to ``BLOCK_M`` = 16 (the smallest tile ``tl.dot`` takes; 8 would do with FMA-based dots), N is split
across programs (``BLOCK_N`` rows of W each: the parallelism of a flat GEMM lives in N), and each
program loops over K in ``BLOCK_K`` steps with ``tl.range(num_stages=...)``, which software-pipelines
the loads of step k + 1 under the math of step k: the paper's double buffering.

Weights: fp32/fp16/bf16 tensors, or a quantized matrix's planes (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K,
Q6_K, Q2_K, as layers/quant.py's ``QuantizedTensor`` holds them: any object with ``format``, ``qs``, ``d``
and ``m``), dequantized in registers right after the load: each weight byte is read once.
Accumulation is fp32; fp32 operands use IEEE dots (no TF32).

On a CPU the kernel runs under ``TRITON_INTERPRET=1`` (set before triton is first imported), which
is how the tests check it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

BLOCK_M = 16
BLOCK_N = 64
BLOCK_K = 64  # a multiple of 32: whole quantization blocks per step
NUM_STAGES = 2

# FMT: 0 float; 1 Q4 - 8; 2 Q4 with a minimum; 3 int8; 4 a byte per value with a minimum; 5 int8 with
# a scale per 16 values; 6 Q4 with a scale and a minimum per 16 values
_FORMATS = {"F": 0, "Q4_0": 1, "Q4_1": 2, "Q4_K": 2, "Q8_0": 3, "Q5_K": 4, "Q6_K": 5, "Q2_K": 6}


@triton.jit
def _flat_gemm_kernel(
    X,
    W,
    D,
    MIN,
    B,
    Y,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_dn,
    stride_ym,
    FMT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            X + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        wmask = mask_n[:, None] & mask_k[None, :]
        if FMT == 0:  # a float weight, any float dtype
            w = tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :], mask=wmask, other=0.0)
        else:
            blk = offs_k // 32
            sblk = offs_k // 16 if FMT >= 5 else blk
            d = tl.load(D + offs_n[:, None] * stride_dn + sblk[None, :], mask=wmask, other=0.0).to(tl.float32)
            if FMT == 3 or FMT == 5:  # int8 values
                q = tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :], mask=wmask, other=0)
                w = q.to(tl.int8).to(tl.float32) * d
            elif FMT == 4:  # a byte per value (0..31) with a minimum
                q = tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :], mask=wmask, other=0)
                mn = tl.load(MIN + offs_n[:, None] * stride_dn + blk[None, :], mask=wmask, other=0.0)
                w = q.to(tl.float32) * d + mn.to(tl.float32)
            else:  # Q4: byte j of a block holds element j (low nibble) and element j + 16 (high nibble)
                inner = offs_k % 32
                byte = blk * 16 + inner % 16
                shift = (inner // 16) * 4
                raw = tl.load(W + offs_n[:, None] * stride_wn + byte[None, :], mask=wmask, other=0)
                q = ((raw.to(tl.int32) >> shift[None, :]) & 0xF).to(tl.float32)
                if FMT == 1:
                    w = (q - 8.0) * d
                else:
                    mn = tl.load(MIN + offs_n[:, None] * stride_dn + sblk[None, :], mask=wmask, other=0.0)
                    w = q * d + mn.to(tl.float32)
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x.to(w.dtype), tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        Y + offs_m[:, None] * stride_ym + offs_n[None, :],
        acc.to(Y.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


def flat_gemm(
    x: torch.Tensor,
    weight: torch.Tensor | Any,
    bias: torch.Tensor | None = None,
    block_n: int = BLOCK_N,
    block_k: int = BLOCK_K,
    num_stages: int = NUM_STAGES,
) -> torch.Tensor:
    """y = x W^T (+ bias) for a 2-D ``x`` [M, K]; the output has x's dtype."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D, got shape {tuple(x.shape)}")
    if block_k % 32:
        raise ValueError("block_k must be a multiple of 32")
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"x has K={k}, weight {tuple(weight.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not isinstance(weight, torch.Tensor):  # quantized planes
        fmt = _FORMATS[weight.format]
        w = weight.qs.reshape(n, -1)
        d, mins = weight.d, (weight.m if weight.m is not None else weight.d)
        stride_dn = d.stride(0)
        dot_f32 = True  # dequantized tiles are fp32
    else:
        fmt, w = 0, (weight if weight.stride(-1) == 1 else weight.contiguous())
        d = mins = w  # unused
        stride_dn = 0
        # fp32 operands: IEEE dots; the interpreter multiplies bf16 bit patterns (triton-lang/triton#11584)
        dot_f32 = w.dtype == torch.float32 or interpreted
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, BLOCK_M))
    _flat_gemm_kernel[grid](
        x,
        w,
        d,
        mins,
        bias if bias is not None else y,
        y,
        m,
        n,
        k,
        x.stride(0),
        w.stride(0),
        stride_dn,
        y.stride(0),
        FMT=fmt,
        HAS_BIAS=bias is not None,
        DOT_F32=dot_f32,
        BLOCK_M=BLOCK_M,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        NUM_STAGES=num_stages,
    )
    return y
