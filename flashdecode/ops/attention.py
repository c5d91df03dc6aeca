"""Paged attention over the KV cache.

The cache stores keys and values per *slot*; block ``b`` of ``block_size`` tokens owns slots
``b * block_size ... b * block_size + block_size - 1``, so a sequence's block table maps its token
positions to slots. A step's tokens arrive flattened: first one query token per decoding sequence,
then each prefilling sequence's chunk (which attends causally to its cached prefix and to itself).

This module holds the exact (synchronised-softmax) reference. FlashDecoding++'s asynchronized softmax
with a unified max value (paper §3) is its sibling path and is selected through ``softmax``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .kv_cache import KVCache


@dataclass
class PrefillSegment:
    """One sequence's chunk: ``num_query`` tokens at flattened offset ``start`` whose keys are the
    first ``context_len`` tokens of the sequence (cached prefix plus the chunk itself)."""

    start: int
    num_query: int
    context_len: int
    slots: torch.Tensor  # [context_len] cache slot of each key position


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    num_decode: int = 0  # the first num_decode flattened tokens are single-token decodes
    decode_slots: torch.Tensor | None = None  # [num_decode, max_context] key slots, padded
    decode_context_lens: torch.Tensor | None = None  # [num_decode]
    prefills: list[PrefillSegment] = field(default_factory=list)


def decode_attention_exact(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """q: [B, H, D]; k, v: [B, L, KVH, D] gathered and padded; returns [B, H, D]."""
    b, h, d = q.shape
    kvh = k.shape[2]
    qg = q.view(b, kvh, h // kvh, d).float()
    # head-major copies: matmul on the gathered [B, L, KVH, D] strides falls off oneDNN's fast paths
    k = k.transpose(1, 2).float().contiguous()
    v = v.transpose(1, 2).float().contiguous()
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [B, KVH, G, L]
    pad = torch.arange(k.shape[2]) >= context_lens[:, None]
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # padding slots hold whatever the cache held (possibly NaN): 0 * NaN would poison the sum
    v.masked_fill_(pad[:, None, :, None], 0.0)
    out = torch.matmul(probs, v)  # [B, KVH, G, D]
    return out.reshape(b, h, d).to(q.dtype)


def prefill_attention_exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [N, H, D] the last N of L positions; k, v: [L, KVH, D]; causal; returns [N, H, D]."""
    n, length = q.shape[0], k.shape[0]
    qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if n == length:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
    else:
        # query i sits at absolute position length - n + i and sees keys 0..that position
        mask = torch.arange(length)[None, :] <= torch.arange(length - n, length)[:, None]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def paged_attention(
    q: torch.Tensor, cache: KVCache, layer: int, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q: [T, H, D] for the step's flattened tokens (their K/V already written); returns [T, H, D]."""
    out = torch.empty_like(q)
    nd = meta.num_decode
    if nd:
        k, v = cache.gather(layer, meta.decode_slots, q.dtype)
        out[:nd] = decode_attention_exact(q[:nd], k, v, meta.decode_context_lens, scale)
    for seg in meta.prefills:
        sl = slice(seg.start, seg.start + seg.num_query)
        k, v = cache.gather(layer, seg.slots, q.dtype)
        out[sl] = prefill_attention_exact(q[sl], k, v, scale)
    return out
