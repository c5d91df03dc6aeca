"""One pipeline stage's part of a step (models/pipeline_parallel.py holds which layers it runs).

Every rank receives the step's inputs (engine/parallel/step.py); a stage after the first waits for
the previous stage's hidden states, of a shape the inputs fix, runs its layers and sends their output
on, each tensor rank to the same tensor rank of the next stage. The last stage computes the logits
(gathered over its tensor group) and its tensor rank 0 sends them back to rank 0, which samples.
Stages run one after another: a step's rows are not split into micro-batches yet, so a stage idles
while the others run.
"""

from __future__ import annotations

import torch

from ...layers.kv_cache import KVCache
from ...models.decoder import Decoder
from .groups import ParallelGroup
from .step import StepInputs


def run_stage(model: Decoder, cache: KVCache, step: StepInputs, group: ParallelGroup) -> torch.Tensor | None:
    """The step's logits on rank 0 (``execute_model``'s), None on every other rank."""
    t, n = group.tensor_size, step.input_ids.numel()
    hidden = None
    if not model.first:
        hidden = group.recv(torch.empty(n, model.spec.hidden_size, dtype=model.dtype), group.rank - t)
    hidden = model.forward(step.input_ids, step.positions, cache, step.meta, hidden)
    last_rank = group.world_size - t  # tensor rank 0 of the last stage
    if not model.last:
        group.send(hidden.to(model.dtype), group.rank + t)
    else:
        logits = model.logits(hidden if step.logit_rows is None else hidden[step.logit_rows])
        if group.rank == last_rank:
            group.send(logits, 0)
    if group.rank != 0:
        return None
    rows = n if step.logit_rows is None else step.logit_rows.numel()
    return group.recv(torch.empty(rows, model.spec.vocab_size * t, dtype=torch.float32), last_rank)
