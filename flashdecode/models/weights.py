"""The loaders' common product: a spec, weights under canonical names, and a tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ModelLoadError
from .spec import ModelSpec
from .tokenizer import Tokenizer


@dataclass
class LoadedModel:
    spec: ModelSpec
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    formats: dict[str, str] = field(default_factory=dict)  # canonical name -> stored format (Q4_1, F32...)
    source: str = ""

    def validate(self) -> None:
        """Every weight the spec needs is present with the right shape; nothing else is left over."""
        expected = self.spec.tensors()
        needed = set(expected)
        missing = sorted(needed - set(self.weights))
        if missing:
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            raise ModelLoadError(f"{self.source}: missing weights {missing[:5]}{more}")
        for name in needed:
            got = tuple(self.weights[name].shape)
            if got != expected[name]:
                raise ModelLoadError(
                    f"{self.source}: weight {name!r} has shape {got}, expected {expected[name]}"
                )
        extra = sorted(set(self.weights) - needed - {"lm_head"})
        if extra:
            raise ModelLoadError(f"{self.source}: unexpected weights {extra[:5]}")
