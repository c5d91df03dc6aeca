"""Continuous batching under a per-step token budget, with chunked prefill and preemption.

Each step: every running sequence gets its next tokens first (one per decoding sequence, the next
chunk for one still prefilling), then waiting sequences are admitted in priority order (lower
``priority`` first, then arrival) while the token budget, ``max_num_seqs`` and free blocks allow. A
prompt larger than the remaining budget is split into chunks over several steps, so a long prompt
never stalls the decodes. When blocks run out, the lowest-priority, latest-arrived running sequence
is preempted: its blocks are freed and it is recomputed later (its full blocks usually survive in the
prefix cache, so "recompute" is mostly a cache hit). On a model whose every layer slides within a
window, a sequence's blocks that its next query's window no longer reaches go back to the pool
before it takes new ones (``BlockManager.remove_skipped_blocks``), so it holds about its window's
blocks however long it runs.

With speculative decoding, a decoding sequence also takes its drafts (``Sequence.spec_token_ids``) into
the step, within the token budget and only where the free blocks allow: drafts never preempt anyone.
The proposer says how many each may take while the step is scheduled, and drafts them once every
sequence has its blocks (a draft model writes its K/V into them), all at once.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Protocol

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    # one new token each, then their drafts (spec_token_ids) when speculating
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, chunk length)

    @property
    def num_tokens(self) -> int:
        return sum(1 + len(s.spec_token_ids) for s in self.decodes) + sum(n for _, n in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


def _order(seq: Sequence) -> tuple[int, int, int]:
    return (seq.priority, seq.request.arrival, seq.index)


class Proposer(Protocol):
    """Speculative decoding's drafts (engine/spec_decode.py): while the step is scheduled, how many
    drafts each decoding sequence may take within ``budget``; once every sequence of the batch has
    its blocks, the drafts of each (sequence, count), set as its ``spec_token_ids``."""

    def num_drafts(self, seq: Sequence, budget: int) -> int: ...

    def propose(self, batch: ScheduledBatch, drafting: list[tuple[Sequence, int]]) -> None: ...


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        proposer: Proposer | None = None,
    ):
        self.blocks = block_manager
        self.proposer = proposer
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []  # sorted by _order
        self.running: list[Sequence] = []  # sorted by _order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=_order)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and return its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status = SequenceStatus.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        seq.spec_token_ids, seq.spec_draft_probs = [], []
        self.running.remove(seq)
        self.blocks.free_sequence(seq)
        self.num_preemptions += 1
        self.add(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        drafts: dict[Sequence, int] = {}
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            self.blocks.remove_skipped_blocks(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            d = 0
            if self.proposer is not None and seq.num_computed_tokens == seq.num_tokens - 1:
                d = self._num_drafts(seq, budget - 1)
                n += d
            # make room, taking blocks from the lowest-priority sequences not yet scheduled
            while not self.blocks.can_allocate(seq, seq.num_computed_tokens + n):
                victim = next((s for s in reversed(self.running) if id(s) not in scheduled), None)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # it was its own victim: every later sequence is already preempted too
            self.blocks.allocate(seq, seq.num_computed_tokens + n)
            scheduled.add(id(seq))
            if seq.num_computed_tokens == seq.num_tokens - 1:
                batch.decodes.append(seq)
                if d:
                    drafts[seq] = d
            else:
                batch.prefills.append((seq, n))
            budget -= n
            i += 1

        # after a preemption memory is short: admitting newcomers would only evict them again
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            queries, hits = self.blocks.reuse_cached_prefix(seq)
            self.blocks.remove_skipped_blocks(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.blocks.can_allocate(seq, seq.num_computed_tokens + n):
                if not self.running and not batch:
                    # nothing else holds blocks: take a smaller chunk rather than waiting forever
                    fit = (len(seq.block_table) + self.blocks.num_free_blocks) * self.blocks.block_size
                    n = min(n, fit - seq.num_computed_tokens)
                if n <= 0 or not self.blocks.can_allocate(seq, seq.num_computed_tokens + n):
                    # a waiting sequence holds no blocks: the adopted prefix goes back to the
                    # (still cached) free list, or waiters could starve each other of blocks
                    self.blocks.free_sequence(seq)
                    break
            self.waiting.pop(0)
            self.blocks.prefix_queries += queries
            self.blocks.prefix_hits += hits
            self.blocks.allocate(seq, seq.num_computed_tokens + n)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=_order)
            scheduled.add(id(seq))
            if n == 1 and seq.num_computed_tokens == seq.num_tokens - 1:
                batch.decodes.append(seq)
            else:
                batch.prefills.append((seq, n))
            budget -= n
        if self.proposer is not None:
            self.proposer.propose(batch, list(drafts.items()))
        return batch

    def _num_drafts(self, seq: Sequence, budget: int) -> int:
        """How many drafts decoding ``seq`` takes this step: what the proposer gives it, where free
        blocks hold them."""
        d = self.proposer.num_drafts(seq, budget) if budget > 0 else 0
        return d if d and self.blocks.can_allocate(seq, seq.num_tokens + d) else 0
