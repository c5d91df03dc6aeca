"""Rotary position embeddings, Hugging Face's half-split layout, with the scalings our families use."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: "llama3" (Llama 3.1's smooth NTK-by-parts), "linear" (positions divided
    by ``factor``) or "freq_factors" (explicit per-frequency divisors, as GGUF files store Llama 3's)."""

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    factors: tuple[float, ...] = ()


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    # fp32 throughout, exactly as transformers computes it, so fp32 logits agree to rounding
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "freq_factors":
        return inv_freq / torch.tensor(scaling.factors, dtype=torch.float32)
    if scaling.kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        low_wavelen = scaling.original_max_position / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        out = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        return torch.where(mid, blended, out)
    raise ValueError(f"unknown rope scaling {scaling.kind!r}")


class RotaryEmbedding:
    """cos/sin tables for every position up to ``max_position``, computed once."""

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        theta: float,
        scaling: RopeScaling | None,
        device: torch.device | str = "cpu",
    ):
        """The tables are computed on the CPU (the same fp32 values on every device) and then
        live on ``device``, where ``tables`` indexes them with the step's positions."""
        inv_freq = inverse_frequencies(head_dim, theta, scaling)
        angles = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        self.cos = angles.cos().to(device)
        self.sin = angles.sin().to(device)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-width cos and sin rows for ``positions`` [T], as [T, 1, head_dim] for ``apply_rope``.

        Every layer of a step rotates the same positions: gather these once per step, not per layer.
        sin carries rotate-half's sign in its first half, so ``apply_rope`` is two products and a sum."""
        cos, sin = self.cos[positions], self.sin[positions]
        return torch.cat((cos, cos), dim=-1).unsqueeze(1), torch.cat((-sin, sin), dim=-1).unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim] (any heads: q and k can rotate together); cos, sin from ``tables``.

    Computed in fp32 (the tables' dtype promotes x), as Hugging Face's x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    out = x * cos + rotated * sin
    return out if out.dtype == x.dtype else out.to(x.dtype)  # a no-op .to still costs a dispatch
