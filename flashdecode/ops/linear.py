"""y = x W^T for every projection of the decoder.

A ``Linear`` owns its weight in the format its kernel consumes, prepared once at load. This is the
seam where FlashDecoding++'s flat GEMM (paper §4) and the tuned per-shape dispatch (paper §5) plug in:
callers only ever see ``Linear.__call__``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight = weight.contiguous()
        self.bias = None if bias is None else bias.contiguous()

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
