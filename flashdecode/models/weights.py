"""The loaders' common product: a spec, weights under canonical names, and a tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ModelLoadError
from .pipeline_parallel import PPStage
from .spec import ModelSpec
from .tensor_parallel import TPShard, local_spec
from .tokenizer import Tokenizer


@dataclass
class LoadedModel:
    spec: ModelSpec
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    formats: dict[str, str] = field(default_factory=dict)  # canonical name -> stored format (Q4_1, F32...)
    source: str = ""
    # tensor parallelism: the shard these weights are (models/tensor_parallel.py); ``spec`` is the
    # whole model's
    shard: TPShard | None = None
    # pipeline parallelism: the stage whose layers these weights are (models/pipeline_parallel.py)
    stage: PPStage | None = None

    @property
    def local_spec(self) -> ModelSpec:
        """The spec of the weights held here: the whole model's, or its shard's."""
        return self.spec if self.shard is None else local_spec(self.spec, self.shard.size)

    def validate(self) -> None:
        """Every weight the spec needs is present with the right shape; nothing else is left over."""
        expected = self.local_spec.tensors()
        if self.stage is not None:
            tied = self.spec.tie_embeddings
            expected = {n: shape for n, shape in expected.items() if self.stage.holds(n, tied)}
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
