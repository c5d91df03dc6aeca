"""Normalisations."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim; ``weight`` broadcasts against x (per-head q/k norms pass [heads, D])."""
    if x.dtype == torch.float32 and weight.shape == x.shape[-1:]:
        return F.rms_norm(x, weight.shape, weight, eps)  # one op, bit-identical to the line below in fp32
    # normalise in fp32 and scale after casting back, as the reference implementations do
    return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)
