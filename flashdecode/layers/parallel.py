"""The collectives a tensor-parallel decoder runs, as the engine hands them down.

The engine owns the process group (engine/parallel/); the decoder only sees a ``Communicator``: its
rank, the group's size, a sum over ranks and a gather along the last dimension. Activations are
replicated on every rank between the collectives, so every rank computes the same norms, RoPE and
routing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch


class Communicator(Protocol):
    rank: int
    world_size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the ranks (in place), identical on every rank."""
        ...

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` concatenated along the last dimension, in rank order."""
        ...


def vocab_parallel_embedding(
    ids: torch.Tensor,
    lookup: Callable[[torch.Tensor], torch.Tensor],
    vocab: tuple[int, int],
    comm: Communicator,
) -> torch.Tensor:
    """Embeddings of ``ids`` where each rank holds the rows of token ids [vocab[0], vocab[1]):
    ``lookup`` reads this rank's rows (local ids), the others' tokens give zeros, and the sum over
    ranks is every token's row (Megatron's vocabulary-parallel embedding)."""
    start, end = vocab
    outside = (ids < start) | (ids >= end)
    x = lookup((ids - start).masked_fill(outside, 0))
    return comm.all_reduce(x.masked_fill(outside[:, None], 0.0))
