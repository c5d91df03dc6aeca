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

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        s = self.spec
        h, q, kv, inter, d = s.hidden_size, s.q_size, s.kv_size, s.intermediate_size, s.head_dim
        per_layer = {
            "attn_norm": (h,),
            "q": (q, h),
            "k": (kv, h),
            "v": (kv, h),
            "o": (h, q),
            "mlp_norm": (h,),
            "gate": (inter, h),
            "up": (inter, h),
            "down": (h, inter),
            "q_bias": (q,),
            "k_bias": (kv,),
            "v_bias": (kv,),
            "q_norm": (d,),
            "k_norm": (d,),
        }
        shapes = {"embed": (s.vocab_size, h), "norm": (h,), "lm_head": (s.vocab_size, h)}
        for name in s.weight_names():
            if name.startswith("layers."):
                shapes[name] = per_layer[name.rsplit(".", 1)[1]]
        return shapes

    def validate(self) -> None:
        """Every weight the spec needs is present with the right shape; nothing else is left over."""
        expected = self.expected_shapes()
        needed = set(self.spec.weight_names())
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
