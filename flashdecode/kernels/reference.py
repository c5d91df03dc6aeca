"""Plain-torch references over a native format's planes (kernels/formats.py): what the C and Triton
kernels must reproduce bit for bit (dequantization) or to rounding (products).

``dequantize`` gives exactly what ``gguf.quants.dequantize`` gives; ``quantize`` rounds float weights
with llama.cpp's reference quantizers.
"""

from __future__ import annotations

import torch

from .formats import BLOCK, BYTE_FORMATS

Planes = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # qs, d, m


def dequantize(fmt: str, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """fp32 [N, K] from the planes of ``fmt`` (any leading row selection already applied)."""
    n = qs.shape[0]
    if fmt == "Q6_K":  # a scale per 16 values
        return (qs.view(torch.int8).float().reshape(n, -1, 16) * d.unsqueeze(-1)).reshape(n, -1)
    d = d.float().unsqueeze(-1)
    if fmt in ("Q8_0", "Q5_K"):
        q = qs.view(torch.int8) if fmt == "Q8_0" else qs
    else:  # 4-bit: byte j holds element j in its low nibble and element j + 16 in its high nibble
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1)
    if fmt == "Q2_K":  # a scale and a min per 16 values
        q = q.reshape(n, -1, 16)
    if fmt == "Q4_0":
        w = (q.float() - 8.0) * d
    elif m is None:
        w = q.float() * d
    else:  # one rounding, as gguf's d * q - dmin * min (d * q and the minimum are exact)
        w = torch.addcmul(m.float().unsqueeze(-1), q.float(), d)
    return w.reshape(n, -1)


def quantize(weight: torch.Tensor, fmt: str) -> Planes:
    """Planes of a float [N, K] matrix (K a multiple of 32) quantized group-wise, with llama.cpp's
    reference rounding (Q8_0: round-half-away of w/d with d = absmax/127; Q4_0: d =
    signed-absmax/-8; Q4_1: d = (max - min)/15, m = min)."""
    if fmt not in BYTE_FORMATS:
        raise ValueError(f"cannot quantize to {fmt}; expected one of {BYTE_FORMATS}")
    n, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"row length {k} is not a multiple of {BLOCK}")
    w = weight.detach().float().reshape(n, k // BLOCK, BLOCK)
    if fmt == "Q8_0":
        d = w.abs().amax(-1) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        x = w * inv.unsqueeze(-1)
        q = (torch.sign(x) * torch.floor(x.abs() + 0.5)).clamp(-127, 127).to(torch.int8)
        return q.view(torch.uint8), d.half(), None
    if fmt == "Q4_0":
        idx = w.abs().argmax(-1, keepdim=True)
        d = torch.gather(w, -1, idx).squeeze(-1) / -8
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        q = torch.trunc(w * inv.unsqueeze(-1) + 8.5).clamp(0, 15).to(torch.uint8)
        m = None
    else:
        lo, hi = w.amin(-1), w.amax(-1)
        d = (hi - lo) / 15
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        q = torch.trunc((w - lo.unsqueeze(-1)) * inv.unsqueeze(-1) + 0.5).clamp(0, 15).to(torch.uint8)
        m = lo.half()
    return q[..., :16] | (q[..., 16:] << 4), d.half(), m


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [M, K] rounded to int8 per 32-block as the int8-activation kernels do: (xq int8 [M, K],
    dx [M, K/32]) with dx = absmax / 127 and xq = x / dx rounded half to even."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // BLOCK, BLOCK)
    dx = blocks.abs().amax(-1) / 127
    inv = torch.where(dx > 0, 1.0 / dx, torch.zeros_like(dx))
    xq = torch.round(blocks * inv.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return xq.reshape(m, k), dx


def linear_q8(x: torch.Tensor, fmt: str, planes: Planes) -> torch.Tensor:
    """float64 [M, N]: what ``fd_linear_q8`` computes up to fp32 rounding, the exact product of the
    int8-rounded activations and the stored weights."""
    xq, dx = quantize_activations(x)
    rounded = (xq.double().reshape(*dx.shape, BLOCK) * dx.double().unsqueeze(-1)).reshape(x.shape)
    return rounded @ dequantize(fmt, *planes).double().T
