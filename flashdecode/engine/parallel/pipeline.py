"""One pipeline stage's part of a step (models/pipeline_parallel.py holds which layers it runs), over
micro-batches in flight.

Every rank receives the step's inputs (engine/parallel/step.py) and cuts them alike into up to P
micro-batches (P stages; never more than the step's sequences): contiguous runs of whole sequences
(a decoding sequence's rows, or one prompt chunk), balanced by rows, each with its own attention
metadata. Stage s runs micro-batch i, sends its hidden states on without waiting (``isend``, each
tensor rank to the same tensor rank of the next stage) and goes on to micro-batch i + 1 while stage
s + 1 runs i; a stage's receives are all posted at the step's start. The last stage computes each
micro-batch's logits (gathered over its tensor group) and its tensor rank 0 sends them to rank 0,
which puts them back in the step's order of logit rows. With P micro-batches of a step in flight a
stage idles only while the pipeline fills and drains; micro-batches of consecutive steps are not in
flight together (rank 0 samples from one step's logits before it schedules the next). Each
micro-batch reads the stage's weights again: the split pays where a step's rows, not its weights,
set a stage's time.

A micro-batch holds whole sequences, whose keys come from earlier steps or from the micro-batch
itself: splitting a step changes which rows share a matmul, not what any row attends to.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import accumulate

import torch

from ...layers.attention import AttentionMetadata
from ...layers.kv_cache import KVCache
from ...models.decoder import Decoder
from .groups import ParallelGroup, Transfer
from .step import StepInputs, seq_decode_rows


@dataclass
class MicroBatches:
    """A rank's count of the steps it ran as a pipeline stage and of their micro-batches."""

    steps: int = 0
    micro_batches: int = 0
    most: int = 0  # the most micro-batches of one step

    def add(self, count: int) -> None:
        self.steps += 1
        self.micro_batches += count
        self.most = max(self.most, count)


@dataclass
class MicroBatch:
    step: StepInputs  # its rows alone, numbered from 0; logit_rows set
    out: torch.Tensor  # where its logits go among the step's logit rows


def _cuts(sizes: list[int], parts: int) -> list[int]:
    """The end of each of ``parts`` non-empty contiguous runs of ``sizes``: each cut where the rows
    before it come nearest to its even share."""
    prefix = list(accumulate(sizes, initial=0))
    total, n, ends = prefix[-1], len(sizes), []
    for k in range(1, parts):
        first = ends[-1] + 1 if ends else 1
        ends.append(min(range(first, n - parts + k + 1), key=lambda j: abs(prefix[j] * parts - k * total)))
    return [prefix[j] for j in ends + [n]]


def _rows(step: StepInputs, start: int, end: int, logit_rows: torch.Tensor) -> MicroBatch:
    """Rows [start, end) of ``step`` (whole sequences) as a step of their own."""
    meta = step.meta
    d0, d1 = min(start, meta.num_decode), min(end, meta.num_decode)
    sub = AttentionMetadata(slot_mapping=meta.slot_mapping[start:end], num_decode=d1 - d0)
    if d1 > d0:
        sub.decode_slots, sub.decode_context_lens = meta.decode_slots[d0:d1], meta.decode_context_lens[d0:d1]
    sub.prefills = [replace(s, start=s.start - start) for s in meta.prefills if start <= s.start < end]
    inside = (logit_rows >= start) & (logit_rows < end)
    ids, positions = step.input_ids[start:end], step.positions[start:end]
    return MicroBatch(StepInputs(ids, positions, sub, logit_rows[inside] - start), inside.nonzero()[:, 0])


def micro_batches(step: StepInputs, most: int) -> list[MicroBatch]:
    """``step`` cut into up to ``most`` micro-batches of whole sequences, balanced by rows."""
    sizes = seq_decode_rows(step).tolist() + [s.num_query for s in step.meta.prefills]
    n = step.input_ids.numel()
    logit_rows = torch.arange(n) if step.logit_rows is None else step.logit_rows
    ends = _cuts(sizes, min(most, len(sizes)))
    return [_rows(step, start, end, logit_rows) for start, end in zip([0] + ends[:-1], ends)]


def run_stage(
    model: Decoder, cache: KVCache, step: StepInputs, group: ParallelGroup, counts: MicroBatches | None = None
) -> torch.Tensor | None:
    """The step's logits on rank 0 (``execute_model``'s), None on every other rank."""
    t, hidden_size = group.tensor_size, model.spec.hidden_size
    batches = micro_batches(step, group.pipeline_size)
    if counts is not None:
        counts.add(len(batches))
    last_rank = group.world_size - t  # tensor rank 0 of the last stage
    inbound: list[Transfer] = []
    if not model.first:
        for i, mb in enumerate(batches):
            buffer = torch.empty(mb.step.input_ids.numel(), hidden_size, dtype=model.dtype)
            inbound.append(group.irecv(buffer, group.rank - t, tag=i))
    vocab = model.spec.vocab_size * t
    logits = _post_logits(batches, group, last_rank, vocab)
    outbound: list[Transfer] = []
    for i, mb in enumerate(batches):
        s = mb.step
        hidden = group.wait(inbound[i]) if inbound else None
        hidden = model.forward(s.input_ids, s.positions, cache, s.meta, hidden)
        if not model.last:
            outbound.append(group.isend(hidden.to(model.dtype), group.rank + t, tag=i))
        elif s.logit_rows.numel():
            part = model.logits(hidden[s.logit_rows])
            if group.rank == last_rank:
                outbound.append(group.isend(part, 0, tag=i))
    for transfer in outbound:
        group.wait(transfer)
    return None if logits is None else _assemble(batches, logits, group, vocab)


def _post_logits(
    batches: list[MicroBatch], group: ParallelGroup, last_rank: int, vocab: int
) -> list[Transfer | None] | None:
    """On rank 0, the receives of every micro-batch's logits (None where it has none)."""
    if group.rank != 0:
        return None
    return [
        group.irecv(torch.empty(mb.out.numel(), vocab, dtype=torch.float32), last_rank, tag=i)
        if mb.out.numel()
        else None
        for i, mb in enumerate(batches)
    ]


def _assemble(
    batches: list[MicroBatch], logits: list[Transfer | None], group: ParallelGroup, vocab: int
) -> torch.Tensor:
    """The micro-batches' logits in the step's order of logit rows."""
    parts = [(mb.out, group.wait(transfer)) for mb, transfer in zip(batches, logits) if transfer is not None]
    if len(parts) == 1:  # every logit row is in one micro-batch, in order
        return parts[0][1]
    out = torch.empty(sum(p.shape[0] for _, p in parts), vocab, dtype=torch.float32)
    for where, part in parts:
        out[where] = part
    return out
