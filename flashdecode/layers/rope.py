"""Rotary position embeddings, Hugging Face's half-split layout, with the scalings our families use.

Partial rotary (``rotary_dim < head_dim``: Phi-3's ``partial_rotary_factor``, only each head's first
``rotary_dim`` dims rotate, half-split within them) costs nothing per step: ``head_dim_order`` is a
permutation of each head's dims, applied once to the q and k projection rows at load, that moves the
pass-through dims between the two rotary halves. ``apply_rope``'s full-width rotate-half then pairs
rotary dim i with i + rotary_dim/2 as Hugging Face does, and pairs the pass-through dims with each other
under cos = 1, sin = 0. Attention only sees q . k, which the same permutation of both leaves unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: "llama3" (Llama 3.1's smooth NTK-by-parts), "linear" (positions divided
    by ``factor``), "freq_factors" (explicit per-frequency divisors, as GGUF files store Llama 3's) or
    "longrope" (Phi-3: per-frequency divisors ``short_factors`` for a context up to
    ``original_max_position``, ``long_factors`` beyond it, and cos/sin multiplied by
    ``attention_factor``)."""

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    factors: tuple[float, ...] = ()
    short_factors: tuple[float, ...] = ()
    long_factors: tuple[float, ...] = ()
    attention_factor: float = 1.0

    def longrope_factors(self, context_len: int) -> tuple[float, ...]:
        """LongRoPE's divisors for a context of ``context_len`` tokens. transformers switches per
        forward pass (long once the sequence is longer than ``original_max_position``); a paged KV cache
        cannot re-rotate its keys, so the choice is made once for the engine's ``max_model_len``, as
        llama.cpp makes it for its context size: identical to transformers for every sequence when
        ``max_model_len <= original_max_position`` (short) and for sequences longer than
        ``original_max_position`` otherwise (long)."""
        return self.long_factors if context_len > self.original_max_position else self.short_factors


def inverse_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling | None, context_len: int | None = None
) -> torch.Tensor:
    """One frequency per rotated pair; ``head_dim``: the rotated dims (``rotary_dim``). ``context_len``
    picks LongRoPE's short or long factors (``RopeScaling.longrope_factors``)."""
    # fp32 throughout, exactly as transformers computes it, so fp32 logits agree to rounding
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.kind == "longrope":
        # no context: the short factors, as transformers' seq_len=None
        factors = scaling.longrope_factors(context_len or scaling.original_max_position)
        if len(factors) != head_dim // 2:
            raise ValueError(f"longrope needs {head_dim // 2} factors, got {len(factors)}")
        # transformers: 1 / (ext_factors * base ** (arange / dim)), in this order
        base = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        return 1.0 / (torch.tensor(factors, dtype=torch.float32) * base)
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


def head_dim_order(head_dim: int, rotary_dim: int) -> list[int] | None:
    """The per-head dim permutation that makes partial rotary a full-width rotate-half (module
    docstring): [rotary first half, pass first half, rotary second half, pass second half]. None
    when every dim rotates."""
    if rotary_dim == head_dim:
        return None
    if rotary_dim % 2 or head_dim % 2 or not 0 < rotary_dim < head_dim:
        raise ValueError(f"rotary_dim={rotary_dim} must be even and within head_dim={head_dim}")
    half, pass_half = rotary_dim // 2, (head_dim - rotary_dim) // 2
    return [
        *range(half),
        *range(rotary_dim, rotary_dim + pass_half),
        *range(half, rotary_dim),
        *range(rotary_dim + pass_half, head_dim),
    ]


class RotaryEmbedding:
    """cos/sin tables for every position up to ``max_position``, computed once."""

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        theta: float,
        scaling: RopeScaling | None,
        device: torch.device | str = "cpu",
        rotary_dim: int | None = None,
        context_len: int | None = None,
    ):
        """The tables are computed on the CPU (the same fp32 values on every device) and then
        live on ``device``, where ``tables`` indexes them with the step's positions.

        ``rotary_dim``: the dims of each head that rotate (default all); the q/k rows must then be in
        ``self.order`` (``head_dim_order``). ``context_len``: the longest sequence the tables serve
        (the engine's ``max_model_len``; default ``max_position``), which picks LongRoPE's factors."""
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        self.order = head_dim_order(head_dim, rotary_dim)
        context = max_position if context_len is None else context_len
        inv_freq = inverse_frequencies(rotary_dim, theta, scaling, context)
        angles = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        cos, sin = angles.cos(), angles.sin()
        if scaling is not None and scaling.attention_factor != 1.0:
            # LongRoPE: transformers multiplies the rotary cos and sin (not the pass-through dims)
            cos, sin = cos * scaling.attention_factor, sin * scaling.attention_factor
        if rotary_dim < head_dim:  # the pass-through pairs: cos 1, sin 0
            keep = torch.ones(max_position, (head_dim - rotary_dim) // 2)
            cos, sin = torch.cat((cos, keep), dim=-1), torch.cat((sin, torch.zeros_like(keep)), dim=-1)
        self.cos = cos.to(device)
        self.sin = sin.to(device)

    def permute_heads(self, w: torch.Tensor, n_heads: int) -> torch.Tensor:
        """q or k projection rows (or a bias, or a per-head norm with ``n_heads`` 1) in ``order``.
        Works on anything with rows in dim 0 whose rows can be indexed (a ``QuantizedTensor``'s
        planes: ``map_rows``)."""
        if self.order is None:
            return w
        head_dim = len(self.order)
        index = (
            torch.tensor(self.order).repeat(n_heads)
            + torch.arange(n_heads).repeat_interleave(head_dim) * head_dim
        )
        if hasattr(w, "map_rows"):
            return w.map_rows(lambda rows: rows[index.to(rows.device)])
        return w[index.to(w.device)]

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
