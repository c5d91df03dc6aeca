"""The step metadata rank 0 broadcasts to the other ranks each step, as fixed-layout int64 tensors.

Two broadcasts a step, never a pickled object: a header of ``HEADER`` counts (on the group the
workers idle on: engine/parallel/groups.py), then one payload whose layout the counts fix: the token
ids, positions and KV slots of the step's rows, the decode rows' padded key slots and context
lengths, each decoding sequence's rows (1 + its drafts), each prefill segment's (start, query tokens,
context length) and key slots, and the rows whose logits are wanted. A header whose command is
``SHUTDOWN`` ends the workers' loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...layers.attention import AttentionMetadata, PrefillSegment
from .groups import ParallelGroup

SHUTDOWN, STEP = 0, 1
# command, tokens, decode rows, decode key width, decoding sequences, prefill segments, prefill key
# slots, logit rows
HEADER = 8


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logit_rows: torch.Tensor | None  # the rows of the hidden states whose logits are wanted; None: all
    # each decoding sequence's rows (1 + its drafts), which a pipeline micro-batch keeps together;
    # None: one each
    decode_rows: torch.Tensor | None = None


def send_step(group: ParallelGroup, step: StepInputs) -> None:
    meta, n = step.meta, step.input_ids.numel()
    width = meta.decode_slots.shape[1] if meta.num_decode else 0
    segments = meta.prefills
    rows = torch.arange(n) if step.logit_rows is None else step.logit_rows
    per_seq = seq_decode_rows(step)
    parts = [step.input_ids, step.positions, meta.slot_mapping]
    if meta.num_decode:
        parts += [meta.decode_slots.reshape(-1), meta.decode_context_lens]
    parts.append(per_seq)
    parts += [torch.tensor([v for s in segments for v in (s.start, s.num_query, s.context_len)])]
    parts += [s.slots[: s.context_len] for s in segments] + [rows]
    num_slots = sum(s.context_len for s in segments)
    counts = [STEP, n, meta.num_decode, width, len(per_seq), len(segments), num_slots, len(rows)]
    group.broadcast(torch.tensor(counts, dtype=torch.int64), idle=True)
    group.broadcast(torch.cat([p.to(torch.int64).reshape(-1) for p in parts]))


def seq_decode_rows(step: StepInputs) -> torch.Tensor:
    """The rows of each decoding sequence (``step.decode_rows``, or one each)."""
    if step.decode_rows is not None:
        return step.decode_rows
    return torch.ones(step.meta.num_decode, dtype=torch.int64)


def send_shutdown(group: ParallelGroup) -> None:
    group.broadcast(torch.tensor([SHUTDOWN] + [0] * (HEADER - 1), dtype=torch.int64), idle=True)


def recv_step(group: ParallelGroup) -> StepInputs | None:
    """The next step's inputs, or None once rank 0 has sent ``SHUTDOWN``."""
    header = group.broadcast(torch.empty(HEADER, dtype=torch.int64), idle=True)
    command, n, num_decode, width, num_seqs, num_segments, segment_slots, num_rows = header.tolist()
    if command == SHUTDOWN:
        return None
    sizes = [n, n, n, num_decode * width, num_decode, num_seqs, 3 * num_segments, segment_slots, num_rows]
    payload = group.broadcast(torch.empty(sum(sizes), dtype=torch.int64))
    ids, positions, slot_mapping, decode_slots, decode_lens, per_seq, triples, slots, rows = payload.split(
        sizes
    )
    meta = AttentionMetadata(slot_mapping=slot_mapping, num_decode=num_decode)
    if num_decode:
        meta.decode_slots, meta.decode_context_lens = decode_slots.view(num_decode, width), decode_lens
    offset = 0
    for start, num_query, context_len in triples.view(-1, 3).tolist():
        segment = slots[offset : offset + context_len]
        meta.prefills.append(PrefillSegment(start, num_query, context_len, segment))
        offset += context_len
    return StepInputs(ids, positions, meta, rows, per_seq)
