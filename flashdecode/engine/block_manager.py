"""Paged KV cache bookkeeping: fixed-size blocks, reference counts, and a prefix cache.

A full block is identified by a hash chained with its predecessor's, so equal hashes mean equal
token prefixes (the tokens are compared too, so a hash collision can never alias two prefixes).
Freed blocks keep their contents and hash and sit in an LRU free list: a later request with the
same prefix takes them back instead of recomputing, until they are evicted for new allocations.

Sliding windows (``sliding_window`` W, given only when every layer of the model slides: a global
layer sees every position, so a model with one keeps all its blocks): a sequence's next query sees
no key before position ``num_computed_tokens - W + 1``, so the blocks wholly before it are released
(``remove_skipped_blocks``, as vLLM's) and their table entries become ``NULL_BLOCK``. The table keeps
its shape, so positions still index it; attention cuts windowed rows to their last W slots
(layers/attention.py) and never reads a null entry. A released block is an ordinary free block: it
keeps its hash and contents, so a later request with the same prefix may adopt it until it is evicted
(its K/V depend only on the tokens up to it), and eviction unpublishes it as any other.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .sequence import Sequence

NULL_BLOCK = -1  # a released block's table entry (a slot of it is negative: no read can pass unseen)


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


def chain_hash(prev_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((prev_hash, token_ids))


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        sliding_window: int | None = None,
    ):
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # every block with ref_count 0, least recently freed first; popitem(last=False) evicts LRU
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # chain hash -> block id
        self.prefix_queries = 0  # blocks looked up in the prefix cache
        self.prefix_hits = 0  # of which were found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self.free)

    def _take_free_block(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]  # evicted: its contents are about to be overwritten
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow ``seq``'s block table to hold ``num_tokens`` tokens; call ``can_allocate`` first."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self._take_free_block())

    def reuse_cached_prefix(self, seq: Sequence) -> tuple[int, int]:
        """Before a sequence's first step: adopt every cached block that matches its leading full
        blocks. At least the last token is always left to compute, since its logits are needed.
        Returns (blocks looked up, blocks found) for the caller to count once the sequence runs."""
        if not self.enable_prefix_caching or seq.block_table or seq.wants_prompt_logprobs:
            return 0, 0
        bs = self.block_size
        prev: int | None = None
        queries = 0
        for start in range(0, seq.num_tokens - 1 - bs + 1, bs):
            tokens = tuple(seq.token_ids[start : start + bs])
            h = chain_hash(prev, tokens)
            queries += 1
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
            prev = h
        seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * bs
        return queries, len(seq.block_table)

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Publish the sequence's newly completed full blocks in the prefix cache. Only blocks whose
        K/V are computed are published, so no reader ever sees a block still being filled."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        for i in range(len(seq.block_hashes), full):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = h, tokens
            self.cached.setdefault(h, block.block_id)

    def remove_skipped_blocks(self, seq: Sequence) -> None:
        """Release the blocks of ``seq`` that no layer's window reaches from its next query on."""
        if self.sliding_window is None:
            return
        first_visible = seq.num_computed_tokens - self.sliding_window + 1
        # released entries are a prefix of the table: walk back from the newest to the first null
        for i in reversed(range(max(0, first_visible) // self.block_size)):
            if seq.block_table[i] == NULL_BLOCK:
                break
            self._release(seq.block_table[i])
            seq.block_table[i] = NULL_BLOCK

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free[block_id] = None

    def free_trailing_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Shrink ``seq``'s block table to the blocks that hold its first ``num_tokens`` tokens: after
        a speculative step, the blocks taken only for rejected drafts go back to the pool. Those
        blocks were never full and computed, so no hash or other sequence refers to them."""
        keep = -(-num_tokens // self.block_size)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def free_sequence(self, seq: Sequence) -> None:
        # release in reverse so a chain's tail is evicted before its head, keeping prefixes reusable
        for block_id in reversed(seq.block_table):
            if block_id != NULL_BLOCK:
                self._release(block_id)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
