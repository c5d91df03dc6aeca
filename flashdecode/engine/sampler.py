"""Turns a batch of next-token logits into next tokens, with vLLM's semantics.

Order of operations (vLLM's): suppressed ids -> repetition/frequency/presence penalties -> the grammar's
allowed-token mask (structured output) -> greedy argmax, or temperature -> top-k -> top-p -> min-p -> sample.
Logprobs are reported from the raw logits, before any of that, as vLLM's default
``logprobs_mode="raw_logprobs"`` does.

A row may carry a draft token (speculative decoding, engine/spec_decode.py): a greedy row still takes
the argmax (the draft is accepted when they agree); a sampled row follows the standard rejection rule:
accept the draft x with probability min(1, p(x) / q(x)), else sample from the residual max(0, p - q),
renormalised, where q is the distribution x was drawn from: a draft model's own (``Sampler.draft``,
under the same sampling parameters), or a point mass on x for an n-gram draft, for which the rule
accepts with probability p(x) and resamples from p with x removed. Either way every emitted token is
distributed as p, exactly as without the draft.

Sampling inverts each row's cumulative distribution at one uniform draw from that row's own generator,
so a seeded request draws the same token whatever else is in the batch. One draw and one cumulative sum
per row cost far less on a CPU than vLLM's exponential race (``argmax(probs / Exp(1))``, a random
exponential for every vocabulary entry, made for GPUs where it avoids a host sync). Rows with nothing
but a temperature (no top-k, top-p, min-p or draft) invert it natively in one pass where the native
kernels run (kernels/cpu, ``fd_sample``): the same distribution, without torch's passes and temporaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flashdecode.kernels import cpu
from flashdecode.outputs import Logprob
from flashdecode.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """The state of one sequence whose next token is being sampled."""

    params: SamplingParams
    # Seeded per request by the engine when params.seed is set, on the logits' device; None -> global RNG.
    generator: torch.Generator | None
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    # Never sampled, e.g. EOS and stop ids while fewer than min_tokens have been generated.
    suppressed_token_ids: Sequence[int] = ()
    # Structured output: the tokens the row's grammar allows next (bool, one per vocabulary entry); every
    # other logit becomes -inf. None (no grammar) costs nothing.
    allowed_token_mask: torch.Tensor | None = None
    # Speculative decoding: the drafted token this row verifies (None: a plain row), and the
    # distribution it was drawn from ([vocab] probabilities; None: a point mass on it, as n-gram drafts).
    draft_token_id: int | None = None
    draft_probs: torch.Tensor | None = None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: None if params.logprobs is None, else the top-`logprobs` tokens plus the sampled token.
    logprobs: list[dict[int, Logprob] | None]


def _has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows)={len(rows)}, vocab], got {tuple(logits.shape)}")
        batch = len(rows)
        if batch == 0:
            return SamplerOutput([], [])

        if all(
            r.params.greedy
            and r.params.logprobs is None
            and not _has_penalties(r.params)
            and len(r.suppressed_token_ids) == 0
            and r.allowed_token_mask is None
            for r in rows
        ):
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [None] * batch)

        lp_rows = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        raw_logprobs = None
        if lp_rows:
            # Taken before any in-place edit below; the caller's logits are never modified.
            raw = logits if len(lp_rows) == batch else logits[lp_rows]
            raw_logprobs = torch.log_softmax(raw.float(), dim=-1)

        x = logits.to(torch.float32, copy=True)
        _suppress(x, rows)
        _apply_penalties(x, rows)
        _apply_grammar_masks(x, logits, rows)

        greedy_rows = [i for i, r in enumerate(rows) if r.params.greedy]
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if not random_rows:
            next_ids = x.argmax(dim=-1)
        else:
            next_ids = torch.empty(batch, dtype=torch.long, device=x.device)
            if greedy_rows:
                next_ids[greedy_rows] = x[greedy_rows].argmax(dim=-1)
            sub = x if len(random_rows) == batch else x[random_rows]
            next_ids[random_rows] = _sample(sub, [rows[i] for i in random_rows])
        token_ids = next_ids.tolist()

        logprobs: list[dict[int, Logprob] | None] = [None] * batch
        if raw_logprobs is not None:
            dicts = _logprob_dicts(
                raw_logprobs, [token_ids[i] for i in lp_rows], [rows[i].params.logprobs for i in lp_rows]
            )
            for i, d in zip(lp_rows, dicts):
                logprobs[i] = d
        return SamplerOutput(token_ids, logprobs)

    def draft(
        self, logits: torch.Tensor, rows: list[SamplingRow]
    ) -> tuple[list[int], list[torch.Tensor | None]]:
        """A draft model's tokens (speculative decoding): each row's token drawn from the draft's
        logits under the row's own sampling parameters, as ``__call__`` would draw it, and the
        distribution q it was drawn from, which verification's rejection rule needs (None for a
        greedy row, whose draft is the argmax and whose verification compares argmaxes)."""
        x = logits.to(torch.float32, copy=True)
        _suppress(x, rows)
        _apply_penalties(x, rows)
        token_ids = x.argmax(dim=-1)
        probs: list[torch.Tensor | None] = [None] * len(rows)
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if random_rows:
            sub = [rows[i] for i in random_rows]
            q = _probs(x[random_rows], sub)
            token_ids[random_rows] = _draw(q, sub)
            for j, i in enumerate(random_rows):
                probs[i] = q[j]
        return token_ids.tolist(), probs


def prompt_logprobs(
    logits: torch.Tensor, next_token_ids: Sequence[int], num: int
) -> list[dict[int, Logprob]]:
    """For each prompt position t: the top-``num`` tokens of ``logits[t]`` plus the prompt's actual next
    token ``next_token_ids[t]``, with ranks (1 = most likely) and raw log-probabilities."""
    if logits.dim() != 2 or logits.shape[0] != len(next_token_ids):
        raise ValueError(
            f"logits must be [len(next_token_ids)={len(next_token_ids)}, vocab], got {tuple(logits.shape)}"
        )
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    if logits.shape[0] == 0:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return _logprob_dicts(logprobs, list(next_token_ids), [num] * logits.shape[0])


def _logprob_dicts(logprobs: torch.Tensor, token_ids: list[int], nums: list[int]) -> list[dict[int, Logprob]]:
    """Row i: ``token_ids[i]`` first, then the top ``nums[i]`` tokens, as vLLM orders them. The chosen
    token's rank counts the tokens at least as likely (ties rank it lower); a top-N entry's rank is its
    position, which also wins when the chosen token is among the top N."""
    vocab = logprobs.shape[1]
    chosen = torch.tensor(token_ids, dtype=torch.long, device=logprobs.device).unsqueeze(1)
    chosen_lp = logprobs.gather(1, chosen)
    chosen_rank = (logprobs >= chosen_lp).sum(dim=-1)
    chosen_lp_list = chosen_lp.squeeze(1).tolist()
    chosen_rank_list = chosen_rank.tolist()

    max_n = min(max(nums), vocab)
    top_vals: list[list[float]] = [[] for _ in nums]
    top_ids: list[list[int]] = [[] for _ in nums]
    if max_n > 0:
        vals, ids = logprobs.topk(max_n, dim=-1)
        top_vals, top_ids = vals.tolist(), ids.tolist()

    out = []
    for i, tok in enumerate(token_ids):
        d = {tok: Logprob(chosen_lp_list[i], chosen_rank_list[i])}
        for rank, (tid, val) in enumerate(zip(top_ids[i][: nums[i]], top_vals[i][: nums[i]]), start=1):
            d[tid] = Logprob(val, rank)
        out.append(d)
    return out


def _suppress(x: torch.Tensor, rows: list[SamplingRow]) -> None:
    row_idx: list[int] = []
    col_idx: list[int] = []
    for i, r in enumerate(rows):
        ids = list(r.suppressed_token_ids)
        row_idx.extend([i] * len(ids))
        col_idx.extend(ids)
    if row_idx:
        x[torch.tensor(row_idx, device=x.device), torch.tensor(col_idx, device=x.device)] = float("-inf")


def _apply_grammar_masks(x: torch.Tensor, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    idx = [i for i, r in enumerate(rows) if r.allowed_token_mask is not None]
    if not idx:
        return
    vocab = x.shape[1]
    masks = []
    for i in idx:
        m = rows[i].allowed_token_mask.to(device=x.device, dtype=torch.bool)
        # the lm_head may be padded past the tokenizer's vocabulary: padding is never allowed
        masks.append(m[:vocab] if m.numel() >= vocab else torch.nn.functional.pad(m, (0, vocab - m.numel())))
    allowed = torch.stack(masks)
    sub = x[idx].masked_fill_(~allowed, float("-inf"))
    # min_tokens can suppress the only tokens the grammar allows (EOS once it is complete): the grammar
    # wins, so such a row keeps its raw logits under the grammar's mask alone
    dead = torch.isneginf(sub).all(dim=-1)
    if dead.any():
        raw = logits[idx].to(torch.float32).masked_fill(~allowed, float("-inf"))
        sub = torch.where(dead.unsqueeze(1), raw, sub)
    x[idx] = sub


def _apply_penalties(x: torch.Tensor, rows: list[SamplingRow]) -> None:
    pen = [i for i, r in enumerate(rows) if _has_penalties(r.params)]
    if not pen:
        return
    num, vocab = len(pen), x.shape[1]
    dev = x.device

    # Token counts for all penalised rows in one bincount over row-offset ids; ids beyond the logits'
    # vocabulary (a tokenizer larger than the lm_head's padded size never happens, but be safe) are dropped.
    out_chunks, prompt_chunks = [], []
    for j, i in enumerate(pen):
        out = torch.as_tensor(rows[i].output_token_ids, dtype=torch.long, device=dev)
        out_chunks.append(out[(out >= 0) & (out < vocab)] + j * vocab)
        if rows[i].params.repetition_penalty != 1.0:
            prm = torch.as_tensor(rows[i].prompt_token_ids, dtype=torch.long, device=dev)
            prompt_chunks.append(prm[(prm >= 0) & (prm < vocab)] + j * vocab)
    counts = torch.bincount(torch.cat(out_chunks), minlength=num * vocab).view(num, vocab).float()
    seen = counts > 0
    if prompt_chunks:
        prompt_seen = torch.bincount(torch.cat(prompt_chunks), minlength=num * vocab).view(num, vocab) > 0
        seen = seen | prompt_seen

    params = [rows[i].params for i in pen]
    rep = torch.tensor([p.repetition_penalty for p in params], device=dev).unsqueeze(1)
    freq = torch.tensor([p.frequency_penalty for p in params], device=dev).unsqueeze(1)
    pres = torch.tensor([p.presence_penalty for p in params], device=dev).unsqueeze(1)

    sub = x[pen]
    # vLLM's (and CTRL's) repetition penalty: shrink positive logits, push negative ones further down.
    penalised = torch.where(sub > 0, sub / rep, sub * rep)
    sub = torch.where(seen, penalised, sub)
    # Frequency and presence count the generated tokens only; the prompt is the repetition penalty's.
    sub = sub - freq * counts - pres * (counts > 0).float()
    x[pen] = sub


def _sample(x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Samples one token per row of penalised logits ``x`` (modified in place) for non-greedy rows."""
    native = cpu.load() if x.device.type == "cpu" and x.stride(1) == 1 else None
    if native is not None and all(_temperature_only(r) for r in rows):
        temps = torch.tensor([r.params.temperature for r in rows], dtype=torch.float32)
        return native.sample(x, temps, _uniforms(rows, x.device).squeeze(1))
    probs = _probs(x, rows)
    accepted = _accept_drafts(probs, rows)
    next_ids = _draw(probs, rows)
    for i, draft in accepted:
        next_ids[i] = draft
    return next_ids


def _temperature_only(row: SamplingRow) -> bool:
    """Nothing but a temperature shapes this row's distribution (no top-k, top-p, min-p or draft)."""
    p = row.params
    return p.top_k in (0, -1) and p.top_p >= 1.0 and p.min_p == 0.0 and row.draft_token_id is None


def _probs(x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The distribution each row samples from: penalised logits ``x`` (modified in place) after
    temperature, top-k, top-p and min-p."""
    vocab = x.shape[1]
    dev = x.device
    params = [r.params for r in rows]

    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
    # top_k of 0, -1 or >= vocab keeps everything; vocab as the "disabled" k makes the masks no-ops.
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    ps = [p.top_p for p in params]
    need_k = any(k < vocab for k in ks)
    need_p = any(p < 1.0 for p in ps)
    x.div_(temps.unsqueeze(1))
    if need_p:
        x = _top_k_top_p(x, ks if need_k else None, ps)
    elif need_k:
        _top_k_only(x, ks)

    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=dev).unsqueeze(1)
        probs = x.softmax(dim=-1)
        # Ratios to the top token survive the renormalisation by top-k/top-p, so min-p after them
        # drops exactly the tokens it would drop from the full distribution.
        x.masked_fill_(probs < probs.amax(dim=-1, keepdim=True) * min_p, float("-inf"))

    return x.softmax(dim=-1)


def _draw(probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """One token per row of ``probs`` (rows need not sum to 1), by inverting its cumulative sum."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    # the first token whose cumulative probability exceeds u * total (u in [0, 1)): never one of
    # probability 0, and u * total rounded up to total is kept below it
    target = torch.minimum(_uniforms(rows, probs.device) * total, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def _uniforms(rows: list[SamplingRow], device: torch.device) -> torch.Tensor:
    """[rows, 1] uniform draws in [0, 1): a seeded row's from its own generator (batch-independent),
    the others' from the global one."""
    u = torch.empty(len(rows), 1, device=device)
    unseeded = [i for i, r in enumerate(rows) if r.generator is None]
    if unseeded:
        u[unseeded] = torch.rand(len(unseeded), 1, device=device)
    for i, r in enumerate(rows):
        if r.generator is not None:
            u[i] = torch.rand(1, generator=r.generator, device=device)
    return u


def _accept_drafts(probs: torch.Tensor, rows: list[SamplingRow]) -> list[tuple[int, int]]:
    """The rows whose draft x is accepted, each with probability min(1, p(x) / q(x)); every draft
    row's ``probs`` become the residual max(0, p - q), which the draw after this renormalises for a
    rejected row. q is the row's ``draft_probs``, or a point mass on x, whose residual is p without x."""
    accepted = []
    for i, r in enumerate(rows):
        x = r.draft_token_id
        if x is None:
            continue
        q = r.draft_probs
        u = torch.rand((), generator=r.generator, device=probs.device)
        if bool(u * (1.0 if q is None else q[x]) < probs[i, x]):
            accepted.append((i, x))
        if q is None:
            probs[i, x] = 0.0
            continue
        residual = (probs[i] - q.to(probs.device)).clamp_min_(0.0)
        # p == q up to rounding leaves no residual: such a draft is accepted but for rounding, and
        # a rejection then draws from p itself
        if bool(residual.sum() > 0):
            probs[i] = residual
    return accepted


def _top_k_only(x: torch.Tensor, ks: list[int]) -> None:
    """Top-k without a full sort: one topk of the largest k in the batch, then a per-row threshold."""
    vocab = x.shape[1]
    disabled = torch.tensor([k >= vocab for k in ks], device=x.device).unsqueeze(1)
    k_index = torch.tensor([min(k, vocab) - 1 for k in ks], device=x.device).unsqueeze(1)
    threshold = x.topk(max(k for k in ks if k < vocab), dim=-1).values
    threshold = threshold.gather(1, k_index.clamp_max(threshold.shape[1] - 1))
    threshold.masked_fill_(disabled, float("-inf"))
    # Ties with the k-th value are all kept, as in vLLM.
    x.masked_fill_(x < threshold, float("-inf"))


def _top_k_top_p(x: torch.Tensor, ks: list[int] | None, ps: list[float]) -> torch.Tensor:
    vocab = x.shape[1]
    dev = x.device
    x_sort, x_idx = x.sort(dim=-1, descending=False)
    if ks is not None:
        k = torch.tensor(ks, dtype=torch.long, device=dev)
        threshold = x_sort.gather(1, (vocab - k).unsqueeze(1))
        x_sort.masked_fill_(x_sort < threshold, float("-inf"))
    p = torch.tensor(ps, dtype=torch.float32, device=dev)
    cum = x_sort.softmax(dim=-1).cumsum(dim=-1)
    # Ascending order: drop the least likely tokens while what they add up to is <= 1 - top_p, i.e. keep the
    # smallest most-likely set whose mass is >= top_p. The top token always stays.
    drop = cum <= (1 - p).unsqueeze(1)
    drop[:, -1] = False
    x_sort.masked_fill_(drop, float("-inf"))
    return x_sort.scatter(dim=-1, index=x_idx, src=x_sort)
