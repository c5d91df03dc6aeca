"""Paged attention over the KV cache: the exact reference and FlashDecoding++'s unified-max softmax.

The cache stores keys and values per *slot*; block ``b`` of ``block_size`` tokens owns slots
``b * block_size ... b * block_size + block_size - 1``, so a sequence's block table maps its token
positions to slots. A step's tokens arrive flattened: first one query token per decoding sequence,
then each prefilling sequence's chunk (which attends causally to its cached prefix and to itself).

Two softmax paths sit side by side here (``SoftmaxPolicy.mode``):

**exact** (the reference): softmax(x) = exp(x - max x) / sum exp(x - max x). Split over key
partitions (Flash-Decoding's split-K, FlashAttention's key blocks), each partition needs its own
running max, and merging partitions rescales every partial sum by exp(m_p - m): a synchronisation.
``decode_attention_exact`` / ``prefill_attention_exact`` are the monolithic references; the engine's
exact path runs ``prefill_attention_exact`` and, for decode, ``decode_attention_softmax`` (the same
whole-row softmax on the unified path's copy-free operands). ``decode_attention_splitk`` /
``prefill_attention_online`` are the synchronised split-K / online-softmax formulations the paper
compares against (same blocking as the fast path).

**unified** (FlashDecoding++, Hong et al., MLSys 2024, section 3, "asynchronized softmax with unified
max value"): softmax is unchanged by subtracting any constant phi, so with one phi per layer chosen
offline (``flashdecode calibrate``) every partition computes sum_j exp(x_j - phi) v_j and
sum_j exp(x_j - phi) on its own and the partials are simply added; one division at the end. Nothing
waits for a max. Because the partials only add, the CPU path lets the PV GEMM's reduction over the
keys accumulate them (decode), or adds each key block's partial into the accumulator (prefill); the
Triton kernels (``kernels/triton/attention.py``) run the partitions as parallel programs and add them.

**The safe window.** exp(x - phi) must neither overflow nor lose the row's dominant terms. The
check costs nothing extra: with l = sum_j exp(x_j - phi) over a row of n keys,
lse = phi + log l satisfies max x <= lse <= max x + log n, so

    n * exp(a) <= l <= exp(b)    implies    a <= max_j x_j - phi    and    every x_j - phi <= b.

``WINDOW_FP32`` = (a, b) for probabilities held in fp32 (the CPU path; bf16 has the same exponent
range), ``WINDOW_FP16`` for fp16 probabilities fed to a tensor-core dot (the Triton path with fp16
inputs): e^11 < 65504 and e^-9 is a normal fp16. A row whose l leaves the window (or is inf/NaN) is
recomputed with the exact synchronised softmax, so the result is always exact; the fallback rate is
what calibration minimises. Fallbacks and checked rows are counted on the policy.

**Soft-capping and sliding windows** (Gemma): ``soft_cap`` turns every scaled score s into
cap * tanh(s / cap) before the softmax, on every path (exact, unified, the fallback recompute and the
calibration statistics). Capped scores never exceed the cap, so in a capped layer the unified max is
min(phi, cap): a phi above every score would only waste the window's lower range, and with phi = cap
no exponent can overflow. The window check and its exact fallback are unchanged. ``sliding_window`` W
lets a query at position p see the keys in (p - W, p]: a decode row reads only its last W slots (so
every decode path, Triton's included, runs unchanged on the shorter rows), and a prefill segment reads
the slots from its first query's window on, with a band mask inside. The Triton kernels implement
neither the cap nor the band, so capped layers and windowed prefills run the torch paths.

K and V are read only through ``KVCache.gather`` (it owns the storage format).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from ..kernels import triton as triton_kernels
from .kv_cache import KVCache

# (a, b) bounds on (max_j x_j - phi), certified through l as explained in the module docstring
WINDOW_FP32 = (-60.0, 60.0)  # exp in fp32: e^60 * |v| stays finite, e^-60 is far above fp32's normal min
WINDOW_FP16 = (-9.0, 11.0)  # probabilities cast to fp16 for the PV dot: e^11 < 65504, e^-9 > 6.1e-5
MAX_ABS_PHI = 80.0  # fp32 exp overflows at 88.7: a phi beyond this is a corrupt calibration

DECODE_PARTITION = 512  # keys per partition of the synchronised split-K baseline
PREFILL_BLOCK_Q = 64  # query tokens per block of the chunked prefill paths
PREFILL_BLOCK_K = 256  # keys per block of the chunked prefill paths


def window_for(dtype: torch.dtype) -> tuple[float, float]:
    """The safe window for probabilities materialised in ``dtype``."""
    return WINDOW_FP16 if dtype == torch.float16 else WINDOW_FP32


@dataclass
class SoftmaxPolicy:
    """Which softmax the attention runs, with its calibration and its counters.

    ``phi``: one value per layer, or a single value for every layer. ``window``: None picks
    ``window_for`` the probabilities' dtype. ``backend``: "auto" runs Triton kernels on CUDA tensors
    and the vectorised torch path elsewhere; "torch" / "triton" force one (tests run Triton on CPU
    under ``TRITON_INTERPRET=1``). ``observer(layer, lse, n)``, when set, receives the exact
    log-sum-exp of every row's scaled logits and the row's key count (calibration uses it).
    """

    mode: str = "exact"  # "exact" or "unified"
    phi: tuple[float, ...] = (0.0,)
    window: tuple[float, float] | None = None
    backend: str = "auto"
    rows_checked: int = 0
    fallbacks: int = 0
    observer: Callable[[int, torch.Tensor, torch.Tensor], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in ("exact", "unified"):
            raise ValueError(f"softmax mode {self.mode!r}: expected exact or unified")
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend {self.backend!r}: expected auto, torch or triton")
        self.phi = tuple(float(p) for p in (self.phi if isinstance(self.phi, (list, tuple)) else [self.phi]))
        if not self.phi or not all(math.isfinite(p) and abs(p) <= MAX_ABS_PHI for p in self.phi):
            raise ValueError(f"phi must be finite values within +-{MAX_ABS_PHI}, got {self.phi}")
        if self.window is not None and not self.window[0] < self.window[1]:
            raise ValueError(f"window {self.window} is empty")

    def phi_at(self, layer: int) -> float:
        return self.phi[layer] if len(self.phi) > 1 else self.phi[0]

    def window_for(self, dtype: torch.dtype) -> tuple[float, float]:
        return self.window if self.window is not None else window_for(dtype)

    def reset_counters(self) -> None:
        self.rows_checked = 0
        self.fallbacks = 0


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


# --- the exact references ----------------------------------------------------------------------


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
    pad = torch.arange(k.shape[2], device=context_lens.device) >= context_lens[:, None]
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # padding slots hold whatever the cache held (possibly NaN): 0 * NaN would poison the sum
    v.masked_fill_(pad[:, None, :, None], 0.0)
    out = torch.matmul(probs, v)  # [B, KVH, G, D]
    return out.reshape(b, h, d).to(q.dtype)


def prefill_attention_exact(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q: [N, H, D] the last N of L positions; k, v: [L, KVH, D]; causal (within ``sliding_window``
    keys when given); scores soft-capped by ``soft_cap`` when given; returns [N, H, D]."""
    n, length = q.shape[0], k.shape[0]
    qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if n == length and soft_cap is None and sliding_window is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1)
    # query i sits at absolute position length - n + i and sees keys 0..that position (in its window)
    pos = torch.arange(length, device=q.device)
    visible = ~_hidden_keys(pos[length - n :], pos, sliding_window)
    if soft_cap is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=visible, scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1)
    g = q.shape[1] // k.shape[1]
    s = soft_cap_(
        torch.matmul(qt.float(), kt.float().repeat_interleave(g, 1).transpose(-1, -2)) * scale, soft_cap
    )
    probs = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
    out = torch.matmul(probs, vt.float().repeat_interleave(g, 1)).to(q.dtype)
    return out[0].transpose(0, 1)


def soft_cap_(s: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(s / cap) in place (transformers' order of operations); ``s`` itself when cap is None."""
    return s if cap is None else s.div_(cap).tanh_().mul_(cap)


def _hidden_keys(query_pos: torch.Tensor, key_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """[queries, keys] True where a key is in the query's future or, with a window W, at or before
    position - W (transformers' sliding mask: a query at p sees keys in (p - W, p])."""
    hidden = key_pos[None, :] > query_pos[:, None]
    if sliding_window is not None:
        hidden |= key_pos[None, :] <= query_pos[:, None] - sliding_window
    return hidden


# --- shared operand preparation ----------------------------------------------------------------
# The fast paths never copy K or V: the (batch, kv head) pairs of a decode batch become one strided
# batch dimension when the cache is gathered key-major (``gather_decode``), and a prefill segment's
# [L, KVH, D] is already a strided [KVH, L, D] batch. Only fp32 casts copy.


def gather_decode(cache: KVCache, layer: int, slots: torch.Tensor, dtype: torch.dtype):
    """K and V of a decode batch as [B, L, KVH, D] views of key-major storage ([L, B, KVH, D]), in
    which every (sequence, kv head) pair is one slice of a single strided batch (``_pairs``)."""
    # contiguous: indexing lays its result out in the index's memory order
    k, v = cache.gather(layer, slots.t().contiguous(), dtype)
    return k.transpose(0, 1), v.transpose(0, 1)


def _pairs(x: torch.Tensor) -> torch.Tensor:
    """fp32 [B, L, KVH, D] -> [B * KVH, L, D], a view when B and KVH merge into one stride (the
    layout of ``gather_decode``), else one copy into that layout."""
    b, length, kvh, d = x.shape
    if x.dtype != torch.float32:
        x = x.float()
    if x.stride(3) != 1 or (b > 1 and kvh > 1 and x.stride(0) != kvh * x.stride(2)):
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    batch_stride = x.stride(2) if kvh > 1 else x.stride(0)
    return x.as_strided((b * kvh, length, d), (batch_stride, x.stride(1), 1))


def _padded_rows(context_lens: torch.Tensor, length: int) -> list[tuple[int, int]]:
    """(row, valid length) of the decode rows shorter than the padded width."""
    # a list, not a tensor compare and nonzero: this runs for every layer and B is small
    return [(i, n) for i, n in enumerate(context_lens.tolist()) if n < length]


def _decode_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    soft_cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scaled queries [B*KVH, G, D], scores [B*KVH, G, L] (soft-capped, -inf past each row's
    length), K and V as [B*KVH, L, D]. Padding keys of V are zeroed in place: garbage (even NaN)
    times a zero probability must not reach a sum."""
    b, h, d = q.shape
    length, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    kp, vp = _pairs(k), _pairs(v)
    qs = (q.float() * scale).view(b * kvh, g, d)
    s = soft_cap_(torch.bmm(qs, kp.transpose(1, 2)), soft_cap)
    for row, n in _padded_rows(context_lens, length):
        vp[row * kvh : (row + 1) * kvh, n:] = 0.0
        s[row * kvh : (row + 1) * kvh, :, n:] = float("-inf")
    return qs, s, kp, vp


def window_ok(lsum: torch.Tensor, n: torch.Tensor, window: tuple[float, float]) -> torch.Tensor:
    """Rows whose unified sum ``lsum = sum exp(x - phi)`` over ``n`` keys certifies
    a <= max x - phi and x - phi <= b (False for inf and NaN)."""
    lo, hi = window
    return (lsum >= n.to(lsum.dtype) * math.exp(lo)) & (lsum <= math.exp(hi))


# --- decode ------------------------------------------------------------------------------------
# q: [B, H, D]; k, v: [B, L, KVH, D] padded to the longest row (views from ``gather_decode`` cost
# no copy; any layout works); context_lens: [B]. Outputs [B, H, D] in q's dtype, computed in fp32.
# The padding positions of an fp32 v are zeroed in place (they hold garbage by definition).


def decode_attention_softmax(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    soft_cap: float | None = None,
) -> torch.Tensor:
    """Exact decode with torch's fused softmax over each whole row, on the fast path's copy-free
    operands: the strongest exact competitor on a CPU, where one thread owns a whole row anyway."""
    _, s, _, vp = _decode_scores(q, k, v, context_lens, scale, soft_cap)
    return torch.bmm(torch.softmax(s, dim=-1), vp).view(q.shape).to(q.dtype)


def decode_attention_splitk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    partition_size: int = DECODE_PARTITION,
) -> torch.Tensor:
    """Exact split-K decode (Flash-Decoding), the paper's baseline: each partition of
    ``partition_size`` keys takes its own max m_p and exponentiates against it; then the partitions
    synchronise on m = max_p m_p and every partition's terms are rescaled by e^(m_p - m) before they
    are added (the rescale is applied to the probabilities so that one PV GEMM serves every
    partition). Vectorised across batch, heads and partitions."""
    _, s, _, vp = _decode_scores(q, k, v, context_lens, scale)
    rows, g, length = s.shape
    full = length // partition_size * partition_size
    parts = [s[..., :full].view(rows, g, -1, partition_size)] if full else []
    if full < length:
        parts.append(s[..., full:].unsqueeze(2))
    maxes = [p.amax(-1, keepdim=True) for p in parts]  # [rows, G, P, 1]; -inf for an empty partition
    m = torch.cat(maxes, 2).amax(2, keepdim=True)
    for p, mp in zip(parts, maxes):
        p.sub_(torch.where(mp == float("-inf"), 0.0, mp)).exp_()
        p.mul_(torch.exp(mp - m))  # the synchronisation
    out = torch.bmm(s, vp) / s.sum(-1, keepdim=True)
    return out.view(q.shape).to(q.dtype)


def decode_attention_unified(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    phi: float,
    window: tuple[float, float] = WINDOW_FP32,
    soft_cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unified-max decode; returns (out [B, H, D], fallback [B, H] bool: the rows that left the
    window and were recomputed with the exact softmax).

    p = exp(x - phi) needs no max, so nothing partitions or synchronises: the PV GEMM's reduction
    over the keys adds every partition's partial sum_j p_j v_j as it goes, and sum_j p_j is one sum.
    """
    b, h, d = q.shape
    qs, s, kp, vp = _decode_scores(q, k, v, context_lens, scale, soft_cap)
    if phi:
        s.sub_(phi)
    s.exp_()
    lsum = s.sum(-1)  # [B*KVH, G]
    out = torch.bmm(s, vp)
    out /= lsum[..., None]
    kvh = k.shape[2]
    fallback = ~window_ok(lsum, context_lens.repeat_interleave(kvh)[:, None], window)
    if bool(fallback.any()):
        for pair in torch.nonzero(fallback.any(-1)).flatten().tolist():
            n = int(context_lens[pair // kvh])
            sel = fallback[pair]
            p = torch.softmax(soft_cap_(qs[pair, sel] @ kp[pair, :n].transpose(0, 1), soft_cap), dim=-1)
            out[pair, sel] = p @ vp[pair, :n]
    return out.view(b, h, d).to(q.dtype), fallback.view(b, h)


# --- prefill -----------------------------------------------------------------------------------
# q: [N, H, D], the last N of a sequence's L positions; k, v: [L, KVH, D]; causal. Blocks of
# ``block_q`` queries x ``block_k`` keys cover the causal lower triangle; K and V are strided
# [KVH, L, D] views (no copy). Outputs [N, H, D] in q's dtype, computed in fp32.


def _prefill_blocks(n: int, length: int, block_q: int, block_k: int, sliding_window: int | None = None):
    """(q0, q1, k0, k1, needs_mask, first, last) over the causal lower triangle of the [n x length]
    scores (within the band of ``sliding_window`` keys when given: key blocks no query of a query
    block sees are skipped)."""
    offset = length - n
    for q0 in range(0, n, block_q):
        q1 = min(n, q0 + block_q)
        visible = offset + q1  # keys the last query of the block sees
        start = 0 if sliding_window is None else max(0, offset + q0 - sliding_window + 1)
        for k0 in range(start, visible, block_k):
            k1 = min(visible, k0 + block_k)
            # some key is in a query's future, or (with a window) too old for the block's last query
            masked = k1 > offset + q0 + 1 or (
                sliding_window is not None and k0 <= visible - 1 - sliding_window
            )
            yield q0, q1, k0, k1, masked, k0 == start, k1 == visible


def _causal_mask(
    q0: int, q1: int, k0: int, k1: int, offset: int, g: int, sliding_window: int | None = None, device=None
) -> torch.Tensor:
    """[(q1 - q0) * G, k1 - k0] True where the key is hidden from the query (``_hidden_keys``);
    rows are (query, group)."""
    pos = torch.arange(offset + q0, offset + q1, device=device).repeat_interleave(g)
    return _hidden_keys(pos, torch.arange(k0, k1, device=device), sliding_window)


def _prefill_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, scale: float):
    """Scaled queries [KVH, N * G, D] (rows ordered (query, group)), K and V as [KVH, L, D]."""
    n, h, d = q.shape
    kvh = k.shape[1]
    qs = (q.float() * scale).view(n, kvh, h // kvh, d).transpose(0, 1).reshape(kvh, n * (h // kvh), d)
    # head-major copies: K and V are read once per query block, so one copy pays for itself
    kp = k.float().transpose(0, 1).contiguous()
    return qs, kp, None if v is None else v.float().transpose(0, 1).contiguous(), h // kvh


def _prefill_out(o: torch.Tensor, n: int, h: int) -> torch.Tensor:
    """[KVH, N * G, ...] -> [N, H, ...]."""
    kvh = o.shape[0]
    return o.view(kvh, n, h // kvh, *o.shape[2:]).transpose(0, 1).reshape(n, h, *o.shape[2:])


def prefill_attention_online(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    block_q: int = PREFILL_BLOCK_Q,
    block_k: int = PREFILL_BLOCK_K,
) -> torch.Tensor:
    """Exact chunked prefill with the synchronised online softmax (FlashAttention-2), the paper's
    prefill baseline: every key block updates the running max and rescales what was accumulated."""
    n, h, d = q.shape
    length = k.shape[0]
    qs, kp, vp, g = _prefill_operands(q, k, v, scale)
    out = torch.empty(kp.shape[0], n * g, d)
    acc = lsum = m = None
    for q0, q1, k0, k1, masked, first, last in _prefill_blocks(n, length, block_q, block_k):
        rows = slice(q0 * g, q1 * g)
        s = torch.bmm(qs[:, rows], kp[:, k0:k1].transpose(1, 2))
        if masked:
            s.masked_fill_(_causal_mask(q0, q1, k0, k1, length - n, g), float("-inf"))
        if first:
            m = s.amax(-1, keepdim=True)
            s.sub_(m).exp_()
            lsum = s.sum(-1, keepdim=True)
            acc = torch.bmm(s, vp[:, k0:k1])
        else:
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            alpha = torch.exp(m - m_new)
            s.sub_(m_new).exp_()
            lsum.mul_(alpha).add_(s.sum(-1, keepdim=True))  # the synchronisation: rescale the partials
            acc.mul_(alpha).baddbmm_(s, vp[:, k0:k1])
            m = m_new
        if last:
            out[:, rows] = acc / lsum
    return _prefill_out(out, n, h).to(q.dtype)


def prefill_attention_unified(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    phi: float,
    window: tuple[float, float] = WINDOW_FP32,
    block_q: int = PREFILL_BLOCK_Q,
    block_k: int = PREFILL_BLOCK_K,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unified-max chunked prefill: every key block adds exp(S - phi) @ V and the row sums of
    exp(S - phi) to the accumulators, with no max and no rescaling. Returns (out [N, H, D],
    fallback [N, H] bool: rows recomputed with the exact softmax)."""
    n, h, d = q.shape
    length, kvh = k.shape[0], k.shape[1]
    offset = length - n
    qs, kp, vp, g = _prefill_operands(q, k, v, scale)
    out = torch.empty(kvh, n * g, d, device=q.device)
    lsums = torch.empty(kvh, n * g, device=q.device)
    acc = lsum = None
    for q0, q1, k0, k1, masked, first, last in _prefill_blocks(n, length, block_q, block_k, sliding_window):
        rows = slice(q0 * g, q1 * g)
        s = soft_cap_(torch.bmm(qs[:, rows], kp[:, k0:k1].transpose(1, 2)), soft_cap)
        if masked:
            hidden = _causal_mask(q0, q1, k0, k1, offset, g, sliding_window, q.device)
            s.masked_fill_(hidden, float("-inf"))
        if phi:
            s.sub_(phi)
        s.exp_()
        if first:
            lsum = s.sum(-1)
            acc = torch.bmm(s, vp[:, k0:k1])
        else:  # the partials are simply added
            lsum += s.sum(-1)
            acc.baddbmm_(s, vp[:, k0:k1])
        if last:
            out[:, rows] = acc / lsum[..., None]
            lsums[:, rows] = lsum
    counts = _key_counts(offset, length, sliding_window, q.device).repeat_interleave(g)
    fallback = ~window_ok(lsums, counts[None, :], window)
    if bool(fallback.any()):
        _prefill_recompute(out, fallback, qs, kp, vp, offset, g, soft_cap, sliding_window)
    return _prefill_out(out, n, h).to(q.dtype), _prefill_out(fallback, n, h)


def _key_counts(offset: int, length: int, sliding_window: int | None, device=None) -> torch.Tensor:
    """Keys each of the queries at positions offset .. length - 1 sees."""
    counts = torch.arange(offset + 1, length + 1, device=device)
    return counts if sliding_window is None else counts.clamp(max=sliding_window)


def _prefill_recompute(
    out: torch.Tensor,
    fallback: torch.Tensor,
    qs: torch.Tensor,
    kp: torch.Tensor,
    vp: torch.Tensor,
    offset: int,
    g: int,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    chunk: int = 256,
) -> None:
    """Exact synchronised softmax for the flagged rows ([KVH, N * G] mask), by kv head."""
    keys = torch.arange(kp.shape[1], device=kp.device)
    for head in range(kp.shape[0]):
        for rows in torch.nonzero(fallback[head]).flatten().split(chunk):
            pos = offset + torch.div(rows, g, rounding_mode="floor")
            s = soft_cap_(qs[head, rows] @ kp[head].transpose(0, 1), soft_cap)
            s.masked_fill_(_hidden_keys(pos, keys, sliding_window), float("-inf"))
            out[head, rows] = torch.softmax(s, dim=-1) @ vp[head]


# --- calibration statistics --------------------------------------------------------------------


def decode_row_lse(
    q: torch.Tensor, k: torch.Tensor, context_lens: torch.Tensor, scale: float, soft_cap: float | None = None
) -> torch.Tensor:
    """Exact log-sum-exp of each decode row's scaled (soft-capped) logits: [B, H]."""
    b, h, d = q.shape
    kvh = k.shape[2]
    s = torch.bmm((q.float() * scale).view(b * kvh, h // kvh, d), _pairs(k).transpose(1, 2))
    soft_cap_(s, soft_cap)
    for row, n in _padded_rows(context_lens, k.shape[1]):
        s[row * kvh : (row + 1) * kvh, :, n:] = float("-inf")
    return torch.logsumexp(s, dim=-1).view(b, h)


def prefill_row_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Exact log-sum-exp of each prefill row's (causal, windowed, soft-capped) scaled logits: [N, H]."""
    n, h, _ = q.shape
    length = k.shape[0]
    qs, kp, _, g = _prefill_operands(q, k, None, scale)
    lse = torch.empty(kp.shape[0], n * g, device=q.device)
    for q0 in range(0, n, PREFILL_BLOCK_Q):
        q1 = min(n, q0 + PREFILL_BLOCK_Q)
        s = soft_cap_(torch.bmm(qs[:, q0 * g : q1 * g], kp.transpose(1, 2)), soft_cap)
        hidden = _causal_mask(q0, q1, 0, length, length - n, g, sliding_window, q.device)
        s.masked_fill_(hidden, float("-inf"))
        lse[:, q0 * g : q1 * g] = torch.logsumexp(s, dim=-1)
    return _prefill_out(lse, n, h)


# --- exact recompute of flagged rows (any device) ----------------------------------------------


def recompute_decode_rows(
    out: torch.Tensor,
    fallback: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> None:
    """Overwrite ``out`` [B, H, D] at the ``fallback`` [B, H] rows with the exact softmax."""
    g = q.shape[1] // k.shape[2]
    for row, head in torch.nonzero(fallback).tolist():
        n = int(context_lens[row])
        kk, vv = k[row, :n, head // g].float(), v[row, :n, head // g].float()
        p = torch.softmax((q[row, head].float() * scale) @ kk.transpose(0, 1), dim=-1)
        out[row, head] = (p @ vv).to(out.dtype)


def recompute_prefill_rows(
    out: torch.Tensor, fallback: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> None:
    """Overwrite ``out`` [N, H, D] at the ``fallback`` [N, H] rows with the exact causal softmax."""
    n, h, _ = q.shape
    offset = k.shape[0] - n
    g = h // k.shape[1]
    for head in torch.nonzero(fallback.any(0)).flatten().tolist():
        rows = torch.nonzero(fallback[:, head]).flatten()
        kk, vv = k[:, head // g].float(), v[:, head // g].float()
        s = (q[rows, head].float() * scale) @ kk.transpose(0, 1)
        future = torch.arange(k.shape[0], device=s.device)[None, :] > (offset + rows)[:, None].to(s.device)
        s.masked_fill_(future, float("-inf"))
        out[rows, head] = (torch.softmax(s, dim=-1) @ vv).to(out.dtype)


# --- the paged entry point ---------------------------------------------------------------------


def _use_triton(policy: SoftmaxPolicy, q: torch.Tensor) -> bool:
    if policy.backend == "triton":
        return True
    if policy.backend == "torch" or not q.is_cuda:
        return False
    return triton_kernels.available()


def window_slots(
    slots: torch.Tensor, lens: torch.Tensor, sliding_window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode batch's key slots [B, L] and lengths [B] cut to each row's last ``sliding_window``
    keys (the current token's own among them), padded to the longest: [B, min(L, W)], [B]."""
    width = min(slots.shape[1], sliding_window)
    start = (lens - sliding_window).clamp(min=0)
    index = (start[:, None] + torch.arange(width, device=slots.device)).clamp(max=slots.shape[1] - 1)
    return slots.gather(1, index), lens.clamp(max=sliding_window)


def window_segment(seg: PrefillSegment, sliding_window: int) -> PrefillSegment:
    """A prefill segment's keys from its first query's window on (``prefill_attention_*`` then mask
    the band within them)."""
    start = max(0, seg.context_len - seg.num_query - sliding_window + 1)
    if start == 0:
        return seg
    return PrefillSegment(seg.start, seg.num_query, seg.context_len - start, seg.slots[start:])


def windowed(meta: AttentionMetadata, sliding_window: int | None) -> AttentionMetadata:
    """``meta`` as a sliding-window layer reads the cache (``window_slots``, ``window_segment``)."""
    if sliding_window is None:
        return meta
    slots, lens = meta.decode_slots, meta.decode_context_lens
    if meta.num_decode:
        slots, lens = window_slots(slots, lens, sliding_window)
    prefills = [window_segment(seg, sliding_window) for seg in meta.prefills]
    return replace(meta, decode_slots=slots, decode_context_lens=lens, prefills=prefills)


def paged_attention(
    q: torch.Tensor,
    cache: KVCache,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
    softmax: SoftmaxPolicy | None = None,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q: [T, H, D] for the step's flattened tokens (their K/V already written); returns [T, H, D].

    ``softmax`` None or mode "exact" runs the exact reference; "unified" the unified-max path, whose
    checked rows and fallbacks are counted on the policy. ``soft_cap`` and ``sliding_window``: the
    layer's score cap and window (module docstring); ``meta`` is the step's, unwindowed."""
    meta = windowed(meta, sliding_window)
    if softmax is not None and softmax.observer is not None:
        _observe(q, cache, layer, meta, scale, softmax, soft_cap, sliding_window)
    if softmax is None or softmax.mode == "exact":
        return _paged_exact(q, cache, layer, meta, scale, soft_cap, sliding_window)
    return _paged_unified(q, cache, layer, meta, scale, softmax, soft_cap, sliding_window)


def _paged_exact(
    q: torch.Tensor,
    cache: KVCache,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
    soft_cap: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    nd = meta.num_decode
    out = torch.empty_like(q)
    if nd:
        # the fused-softmax formulation of the exact reference, on copy-free operands
        k, v = gather_decode(cache, layer, meta.decode_slots, q.dtype)
        res = decode_attention_softmax(q[:nd], k, v, meta.decode_context_lens, scale, soft_cap)
        if not meta.prefills:
            return res
        out[:nd] = res
    for seg in meta.prefills:
        sl = slice(seg.start, seg.start + seg.num_query)
        k, v = cache.gather(layer, seg.slots, q.dtype)
        out[sl] = prefill_attention_exact(q[sl], k, v, scale, soft_cap, sliding_window)
    return out


def _paged_unified(
    q: torch.Tensor,
    cache: KVCache,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
    softmax: SoftmaxPolicy,
    soft_cap: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    out = torch.empty_like(q)
    nd = meta.num_decode
    phi = softmax.phi_at(layer)
    if soft_cap is not None:  # capped scores never exceed the cap (module docstring)
        phi = min(phi, soft_cap)
    # the Triton kernels cap no scores and mask no band (module docstring)
    decode_triton = _use_triton(softmax, q) and soft_cap is None
    prefill_triton = decode_triton and sliding_window is None
    fallbacks = []
    if nd:
        k, v = gather_decode(cache, layer, meta.decode_slots, q.dtype)
        lens = meta.decode_context_lens
        if decode_triton:
            from ..kernels.triton.attention import decode_attention_triton

            res, lsum = decode_attention_triton(q[:nd], k, v, lens, scale, phi)
            fallback = ~window_ok(lsum, lens[:, None].to(lsum.device), softmax.window_for(q.dtype))
            if bool(fallback.any()):
                recompute_decode_rows(res, fallback, q[:nd], k, v, lens, scale)
        else:
            res, fallback = decode_attention_unified(
                q[:nd], k, v, lens, scale, phi, softmax.window_for(torch.float32), soft_cap
            )
        out[:nd] = res
        fallbacks.append(fallback)
    for seg in meta.prefills:
        sl = slice(seg.start, seg.start + seg.num_query)
        k, v = cache.gather(layer, seg.slots, q.dtype)
        if prefill_triton:
            from ..kernels.triton.attention import prefill_attention_triton

            res, lsum = prefill_attention_triton(q[sl], k, v, scale, phi)
            counts = torch.arange(
                seg.context_len - seg.num_query + 1, seg.context_len + 1, device=lsum.device
            )
            fallback = ~window_ok(lsum, counts[:, None], softmax.window_for(q.dtype))
            if bool(fallback.any()):
                recompute_prefill_rows(res, fallback, q[sl], k, v, scale)
        else:
            res, fallback = prefill_attention_unified(
                q[sl],
                k,
                v,
                scale,
                phi,
                softmax.window_for(torch.float32),
                soft_cap=soft_cap,
                sliding_window=sliding_window,
            )
        out[sl] = res
        fallbacks.append(fallback)
    for fallback in fallbacks:
        softmax.rows_checked += fallback.numel()
        softmax.fallbacks += int(fallback.sum())
    return out


def _observe(
    q: torch.Tensor,
    cache: KVCache,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
    policy: SoftmaxPolicy,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
) -> None:
    """Hand the exact log-sum-exp of every row, with its key count, to ``policy.observer``."""
    nd = meta.num_decode
    if nd:
        k, _ = gather_decode(cache, layer, meta.decode_slots, q.dtype)
        lens = meta.decode_context_lens
        lse = decode_row_lse(q[:nd], k, lens, scale, soft_cap)
        policy.observer(layer, lse, lens[:, None].expand_as(lse))
    for seg in meta.prefills:
        k, _ = cache.gather(layer, seg.slots, q.dtype)
        lse = prefill_row_lse(q[seg.start : seg.start + seg.num_query], k, scale, soft_cap, sliding_window)
        counts = _key_counts(seg.context_len - seg.num_query, seg.context_len, sliding_window)
        policy.observer(layer, lse, counts[:, None].expand_as(lse))
