"""Normalisations."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim; ``weight`` broadcasts against x (per-head q/k norms pass [heads, D]).

    A weight in x's dtype scales after the cast back, as Llama's reference does; an fp32 weight under
    16-bit activations (Gemma's 1 + w) scales before it, as Gemma's does."""
    if x.dtype == torch.float32 and weight.shape == x.shape[-1:]:
        return F.rms_norm(x, weight.shape, weight, eps)  # one op, bit-identical to the lines below in fp32
    normed = F.rms_norm(x.float(), x.shape[-1:], eps=eps)
    if weight.dtype == torch.float32:
        return (normed * weight).to(x.dtype)
    return weight * normed.to(x.dtype)
