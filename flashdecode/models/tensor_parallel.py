"""Which part of each weight one tensor-parallel rank holds (Megatron's layout).

With T ranks, q, gate and up are split by output rows (whole heads of q), k and v by whole KV heads
(each rank holds ``max(1, KV heads / T)``; where T exceeds the KV heads, rank r holds head
``r // (T / KV heads)``, as vLLM replicates them), o and down by input columns (each rank's product
is a partial sum: the decoder adds them with one all-reduce), and the embedding and head by
vocabulary rows. ``TensorDef.tp`` (models/spec.py) names each weight's split. Every rank then runs
the decoder on the spec of its shard (``local_spec``): its heads, its share of the MLP and of the
vocabulary, so the decoder's shapes and the KV cache (sharded by heads) follow from the spec alone.

Quantized blocks split on block boundaries: output splits move whole rows, input splits whole
32-element blocks of K (every native layout stores planes of 32, K-quants included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import FlashDecodeError
from ..kernels.formats import BLOCK
from ..layers.quant import QuantizedTensor
from .spec import ModelSpec


@dataclass(frozen=True)
class TPShard:
    rank: int
    size: int


def check_divisible(spec: ModelSpec, size: int) -> None:
    """A clear error where ``size`` ranks cannot share ``spec`` evenly."""
    kvh = spec.num_kv_heads
    sizes = {
        "attention heads": spec.num_heads,
        "vocabulary": spec.vocab_size,
        "intermediate size": spec.intermediate_size,
    }
    if spec.family.moe:
        sizes["expert intermediate size"] = spec.moe_intermediate_size
        if spec.shared_expert_intermediate_size:
            sizes["shared expert intermediate size"] = spec.shared_expert_intermediate_size
    for what, n in sizes.items():
        if n % size:
            raise FlashDecodeError(f"tensor_parallel_size={size} does not divide the model's {what} ({n})")
    if (kvh % size) if size <= kvh else (size % kvh):
        raise FlashDecodeError(
            f"tensor_parallel_size={size} and the model's {kvh} KV heads: one must divide the other"
        )


def local_spec(spec: ModelSpec, size: int) -> ModelSpec:
    """The spec of one rank's shard: its heads, MLP width and vocabulary rows."""
    check_divisible(spec, size)
    return spec.with_(
        num_heads=spec.num_heads // size,
        num_kv_heads=max(1, spec.num_kv_heads // size),
        intermediate_size=spec.intermediate_size // size,
        moe_intermediate_size=spec.moe_intermediate_size // size,
        shared_expert_intermediate_size=spec.shared_expert_intermediate_size // size,
        vocab_size=spec.vocab_size // size,
    )


def vocab_range(spec: ModelSpec, shard: TPShard) -> tuple[int, int]:
    """The token ids whose embedding and head rows ``shard`` holds."""
    rows = spec.vocab_size // shard.size
    return shard.rank * rows, (shard.rank + 1) * rows


def _bounds(spec: ModelSpec, split: str, length: int, shard: TPShard) -> tuple[int, int]:
    """[start, end) of ``shard``'s part of a dimension of ``length`` split as ``split``."""
    if split == "kv":
        kvh, t = spec.num_kv_heads, shard.size
        first = shard.rank * kvh // t if t <= kvh else shard.rank // (t // kvh)
        per_head = length // kvh
        return first * per_head, (first + max(1, kvh // t)) * per_head
    part = length // shard.size
    return shard.rank * part, (shard.rank + 1) * part


class ShardPlan:
    """What one rank holds of every weight of the full ``spec``: the loaders cut each weight as they
    read it, so no rank ever holds more than its shard and the one weight being read."""

    def __init__(self, spec: ModelSpec, shard: TPShard):
        check_divisible(spec, shard.size)
        self.spec, self.shard = spec, shard
        self.splits = {name: t.tp for name, t in spec.tensor_defs().items()}

    def rows(self, name: str, rows: int) -> tuple[int, int] | None:
        """The rows of weight ``name`` this rank holds where it splits by rows (a loader reads only
        those), else None (it reads the whole weight and ``cut`` takes this rank's part)."""
        split = self.splits.get(name)
        if split not in ("column", "kv", "vocab"):
            return None
        return _bounds(self.spec, split, rows, self.shard)

    def cut(self, name: str, w: Any) -> Any:
        """This rank's part of the full weight ``name`` (a torch tensor or ``QuantizedTensor``)."""
        split, shard = self.splits.get(name), self.shard
        if split is None:
            return w
        if split == "row_bias":  # the all-reduce sums every rank's output: the bias enters once
            return w if shard.rank == 0 else torch.zeros_like(w)
        if split != "row":
            start, end = _bounds(self.spec, split, w.shape[0], shard)
            if isinstance(w, QuantizedTensor):
                return w.map_rows(lambda plane: plane[start:end])
            return w[start:end].contiguous()
        start, end = _bounds(self.spec, split, w.shape[1], shard)
        if not isinstance(w, QuantizedTensor):
            return w[:, start:end].contiguous()
        if start % BLOCK:
            raise FlashDecodeError(
                f"{name}: tensor_parallel_size={shard.size} splits its {w.shape[1]} inputs off the "
                f"{BLOCK}-element blocks of {w.format}"
            )
        return w.columns(start // BLOCK, end // BLOCK)
