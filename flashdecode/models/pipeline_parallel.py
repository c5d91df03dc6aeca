"""Which layers one pipeline stage holds: P contiguous stages, the first ``num_layers % P`` a layer
longer (vLLM's even partition).

The first stage also holds what turns token ids into the first layer's input (the embedding, OPT's
learned positions and projection in), the last what turns the last layer's output into logits (the
final norm, OPT's projection out, the head; a tied head is the embedding matrix, so the last stage
holds it too). Every stage's KV cache holds its own layers alone: the decoder indexes the cache by
its layers' positions within the stage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import FlashDecodeError
from .spec import ModelSpec

_LAYER = re.compile(r"layers\.(\d+)\.")
_FIRST = {"embed", "pos_embed", "project_in"}
_LAST = {"norm", "norm_bias", "project_out", "lm_head"}


@dataclass(frozen=True)
class PPStage:
    index: int
    size: int  # the number of stages
    start: int  # the stage's layers: [start, end)
    end: int

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.size - 1

    def holds(self, name: str, tied: bool) -> bool:
        """Whether this stage loads the weight of canonical ``name``."""
        m = _LAYER.match(name)
        if m:
            return self.start <= int(m.group(1)) < self.end
        if name == "embed" and tied:
            return self.first or self.last
        if name in _FIRST:
            return self.first
        return self.last if name in _LAST else True


def check_stages(spec: ModelSpec, size: int) -> None:
    """A clear error where ``size`` stages cannot each hold a layer of ``spec``."""
    if size > spec.num_layers:
        raise FlashDecodeError(
            f"pipeline_parallel_size={size} exceeds the model's {spec.num_layers} layers: "
            "every stage needs at least one"
        )


def pipeline_stage(spec: ModelSpec, index: int, size: int) -> PPStage:
    check_stages(spec, size)
    per, longer = divmod(spec.num_layers, size)
    start = index * per + min(index, longer)
    return PPStage(index, size, start, start + per + (index < longer))
