"""Turns a scheduled batch into the model's input tensors and runs it.

Flattened token order: the decoding sequences' rows first, then each prefill chunk. A decoding
sequence is one row (its last token) plus one per draft when speculating (engine/spec_decode.py):
rows at consecutive positions sharing its block table, each with its own context length, so the
model sees them as ordinary decode rows whose K/V are all written before any row attends. Logits
are computed only where they are needed: at every decode row, at each prefilled sequence's last
known token (to sample the next one) and, for requests that asked for prompt logprobs, at every
position of their chunk.

A draft model (speculative decoding, engine/spec_decode.py) has a runner of its own, over its own
KV cache in the same blocks: ``forward`` runs a step's inputs through it for their K/V alone, and
``decode`` its drafting rows.

Inputs are built in host memory from the sequences' Python lists; on a device elsewhere (``device=
"cuda"``) they are moved there in one place, and the logits come back to the host for the sampler.
Under tensor and pipeline parallelism the inputs are broadcast to the other ranks
(engine/parallel/step.py), which run ``execute_model`` on them as this rank does (under pipeline
parallelism, each its stage: engine/parallel/pipeline.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..layers.attention import AttentionMetadata, PrefillSegment
from ..layers.kv_cache import KVCache
from ..models.decoder import Decoder
from .parallel.groups import ParallelGroup
from .parallel.pipeline import MicroBatches, run_stage
from .parallel.step import StepInputs, send_step
from .scheduler import ScheduledBatch
from .sequence import Sequence


@dataclass
class StepResult:
    sample_seqs: list[Sequence]  # sequences whose next token is to be sampled, in logits order
    # [rows, vocab] float32: 1 + len(seq.spec_token_ids) consecutive rows per sample sequence
    logits: torch.Tensor
    # (sequence, first position, logits [n, vocab]): logits at position p predict prompt token p + 1
    prompt_logits: list[tuple[Sequence, int, torch.Tensor]] = field(default_factory=list)


@torch.inference_mode()
def execute_model(
    model: Decoder,
    cache: KVCache,
    step: StepInputs,
    group: ParallelGroup | None = None,
    counts: MicroBatches | None = None,
) -> torch.Tensor | None:
    """The logits [rows, vocab] of the step's ``logit_rows`` (every rank runs this on the same inputs);
    under pipeline parallelism each rank runs its stage over the step's micro-batches (counted in
    ``counts``), and only rank 0 gets the logits."""
    if group is not None and group.pipeline_size > 1:
        return run_stage(model, cache, step, group, counts)
    hidden = model.forward(step.input_ids, step.positions, cache, step.meta)
    return model.logits(hidden if step.logit_rows is None else hidden[step.logit_rows])


class ModelRunner:
    def __init__(
        self,
        model: Decoder,
        cache: KVCache,
        block_size: int,
        device: torch.device | str | None = None,
        group: ParallelGroup | None = None,
    ):
        """``device``: where the model's tensors live (the engine's ``Device.torch``); None or a
        CPU device: nothing moves (resolved here, once: the host's step does no extra work).
        ``group``: the tensor-parallel group, whose other ranks receive every step's inputs."""
        self.group = group
        self.micro_batches = MicroBatches()  # this rank's pipeline micro-batches, as the first stage
        self.model = model
        self.cache = cache
        self.block_size = block_size
        device = None if device is None else torch.device(device)
        self.device = None if device is None or device.type == "cpu" else device

    def _to_device(
        self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's inputs, moved to ``self.device`` (``meta`` in place)."""
        dev = self.device

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(dev, non_blocking=True)

        meta.slot_mapping = move(meta.slot_mapping)
        if meta.decode_slots is not None:
            meta.decode_slots = move(meta.decode_slots)
            meta.decode_context_lens = move(meta.decode_context_lens)
        for seg in meta.prefills:
            seg.slots = move(seg.slots)
        return move(ids), move(positions)

    def _slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        positions = torch.arange(start, end)
        table = torch.tensor(seq.block_table, dtype=torch.long)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def _decode_inputs(self, seqs: list[Sequence], lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded key-slot matrix [rows, max_context] and context lengths [rows] of the decode rows:
        ``lens`` holds one context length per row, 1 + len(spec_token_ids) rows per sequence."""
        bs = self.block_size
        width = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs])
        slots = (tables[:, :, None] * bs + torch.arange(bs)).reshape(len(seqs), -1)
        if len(lens) > len(seqs):  # drafting sequences repeat their slot row, once per draft
            counts = torch.tensor([1 + len(s.spec_token_ids) for s in seqs])
            slots = slots.repeat_interleave(counts, dim=0)
        return slots[:, : max(lens)], torch.tensor(lens)

    def _inputs(
        self, batch: ScheduledBatch
    ) -> tuple[
        torch.Tensor,
        torch.Tensor,
        AttentionMetadata,
        list[int],
        list[Sequence],
        list[tuple[Sequence, int, int, int]],
    ]:
        """The step's input ids, positions and attention metadata, the rows to sample and their
        sequences, and the spans whose prompt logprobs are wanted (sequence, flat start, first
        position, count)."""
        # each decoding sequence's new token at position num_tokens - 1 (and its drafts after it): the
        # inputs come from Python ints in one go, since per-sequence tensors cost more than the
        # arithmetic every step
        bs = self.block_size
        ids: list[int] = []
        decode_pos: list[int] = []
        new_slots: list[int] = []
        for seq in batch.decodes:
            ids.append(seq.token_ids[-1])
            ids.extend(seq.spec_token_ids)
            for p in range(seq.num_tokens - 1, seq.num_tokens + len(seq.spec_token_ids)):
                decode_pos.append(p)
                new_slots.append(seq.block_table[p // bs] * bs + p % bs)
        pos = [torch.tensor(decode_pos, dtype=torch.long)]
        slot_parts = [torch.tensor(new_slots, dtype=torch.long)]
        meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), num_decode=len(ids))
        sample_rows = list(range(len(ids)))
        sample_seqs = list(batch.decodes)
        if batch.decodes:
            meta.decode_slots, meta.decode_context_lens = self._decode_inputs(
                batch.decodes, [p + 1 for p in decode_pos]
            )

        prompt_spans: list[tuple[Sequence, int, int, int]] = []  # seq, flat start, first pos, count
        for seq, n in batch.prefills:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            flat = len(ids)
            ids.extend(seq.token_ids[start:end])
            pos.append(torch.arange(start, end))
            all_slots = self._slots(seq, 0, end)
            slot_parts.append(all_slots[start:end])
            meta.prefills.append(PrefillSegment(start=flat, num_query=n, context_len=end, slots=all_slots))
            if end == seq.num_tokens:
                sample_rows.append(flat + n - 1)
                sample_seqs.append(seq)
            recorded = len(seq.request.prompt_logprobs)
            if seq.wants_prompt_logprobs and recorded < seq.num_prompt_tokens:
                first = max(start, recorded - 1)
                last = min(end, seq.num_prompt_tokens - 1)
                if last > first:
                    prompt_spans.append((seq, flat + first - start, first, last - first))

        meta.slot_mapping = torch.cat(slot_parts)
        input_ids, positions = torch.tensor(ids, dtype=torch.long), torch.cat(pos)
        if self.device is not None:
            input_ids, positions = self._to_device(input_ids, positions, meta)
        return input_ids, positions, meta, sample_rows, sample_seqs, prompt_spans

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch) -> torch.Tensor:
        """The step's hidden states, its K/V written (a draft model's runner: it needs no logits of
        the step's rows)."""
        input_ids, positions, meta, *_ = self._inputs(batch)
        return self.model.forward(input_ids, positions, self.cache, meta)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        input_ids, positions, meta, sample_rows, sample_seqs, prompt_spans = self._inputs(batch)
        # one head product for every row whose logits are wanted: the sampled rows, then the prompt
        # spans; sample_rows ascend, so when they are every row (a pure decode step) they are all of it
        rows = sample_rows + [r for _, flat, _, count in prompt_spans for r in range(flat, flat + count)]
        n = len(input_ids)
        logit_rows = None if len(rows) == n == len(sample_rows) else torch.tensor(rows, dtype=torch.long)
        step = StepInputs(input_ids, positions, meta, logit_rows)
        if self.group is not None and any(s.spec_token_ids for s in batch.decodes):  # kept in one micro-batch
            step.decode_rows = torch.tensor([1 + len(s.spec_token_ids) for s in batch.decodes])
        if self.group is not None:
            send_step(self.group, step)
        all_logits = execute_model(self.model, self.cache, step, self.group, self.micro_batches)
        logits = all_logits[: len(sample_rows)]
        prompt_logits, start = [], len(sample_rows)
        for seq, _, first, count in prompt_spans:
            prompt_logits.append((seq, first, all_logits[start : start + count]))
            start += count
        if self.device is not None:  # the sampler runs on the host
            logits = logits.cpu()
            prompt_logits = [(seq, first, lg.cpu()) for seq, first, lg in prompt_logits]
        return StepResult(sample_seqs=sample_seqs, logits=logits, prompt_logits=prompt_logits)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """Hidden states [len(seqs), hidden] of one decode row per sequence: ``token_ids[i]`` at
        ``positions[i]`` of ``seqs[i]``, attending to the positions before it in its blocks (a draft
        model's drafting rows, in slots the scheduler allocated for the drafts)."""
        bs = self.block_size
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, positions)]
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long), num_decode=len(seqs))
        meta.decode_slots, meta.decode_context_lens = self._decode_inputs(seqs, [p + 1 for p in positions])
        input_ids = torch.tensor(token_ids, dtype=torch.long)
        pos = torch.tensor(positions, dtype=torch.long)
        if self.device is not None:
            input_ids, pos = self._to_device(input_ids, pos, meta)
        return self.model.forward(input_ids, pos, self.cache, meta)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits of ``hidden`` rows, on the host (where the sampler runs)."""
        logits = self.model.logits(hidden)
        return logits.cpu() if self.device is not None else logits
