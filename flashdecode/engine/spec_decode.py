"""Speculative decoding: drafts by n-gram prompt lookup or by a draft model, verified in the step that
decodes.

Each step, a decoding sequence may draft up to ``num_speculative_tokens`` tokens. ``ngram``: the
tokens that followed an earlier occurrence of its last n tokens in its prompt and output (n from
``prompt_lookup_max`` down to ``prompt_lookup_min``, longest first, as vLLM's prompt lookup does), the
occurrence whose match runs furthest back; input-grounded work (summaries, edits, answers from a
passage) repeats its input, so the drafts are often right, and the further back the match runs
the likelier: a copy under way is accepted almost always, a one-token match seldom. ``draft``: a
smaller model with the target's vocabulary samples them one at a time (``DraftModelProposer``), for
all drafting sequences at once, with its own KV cache in the target's blocks; verification's
rejection rule uses the draft's distribution (engine/sampler.py).

A sequence with d drafts is d + 1 decode rows of the step (engine/model_runner.py): its last token
and the drafts, at consecutive positions, sharing its block table, each attending up to its own
position. The projections then run at M = d + 1 and read the weights once for all the rows
(FlashDecoding++'s flat GEMM), which makes verification cheap where reading the weights bounds a
step. The sampler (engine/sampler.py) decides each row as
plain decoding would at that position, with the penalty state after the drafts before it; the engine
keeps the accepted drafts and the token after them (engine/llm_engine.py), and the rejected rows'
K/V slots are overwritten later or their blocks freed.

The draft length adapts per sequence. With an acceptance rate a per draft, d drafts emit
``1 + a + ... + a^d`` tokens in a step of d + 1 rows; the length with the most tokens per cost is
drafted (zero when no length beats plain decoding). The cost of d + 1 rows, in one-row steps, is the
engine's own: it times its decode steps by their rows as they run (``StepCostMeter``), and once it
has timed steps of 1 and of d + 1 rows enough, their medians' ratio is the cost (a longer draft, not
yet timed, is priced at the rows of the longest timed step below it). Before that it comes
from the tuned dataflow table where it timed every projection of the model (``tuned_step_costs``:
each shape's planned kernel at each M; attention, which reads the context once per row, is left
out), else it is ``1 + d * draft_row_cost``. A draft model's passes are added to it
(``draft_step_costs``), a draft row priced by its timed one-row passes over the target's one-row
steps, before that by its weights' bytes over the target's. The meter keys steps by their total
rows, so it prices a drafted row exactly at batch 1 and roughly in a batch. The rate is the
sequence's own over its recent steps: a draft model's over all its drafts
(``Sequence.draft_history``), an n-gram lookup's over its drafts from matches about as long as this
one (``MatchHistory``), so that a copy drafts the longest draft that pays while a chance match
drafts nothing.
"""

from __future__ import annotations

import abc
import math
import statistics
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable

import numpy as np
import torch

from ..config import SpeculativeConfig
from ..kernels.formats import bytes_per_weight
from ..layers.dataflow import DataflowTable
from ..layers.linear import Linear
from .model_runner import ModelRunner
from .sampler import Sampler, SamplingRow
from .scheduler import ScheduledBatch
from .sequence import Sequence


def best_draft_length(acceptance_rate: float, max_drafts: int, step_costs: list[float]) -> int:
    """The number of drafts that maximises the expected tokens per step cost (0: do not draft);
    ``step_costs[d]``: the cost of a step of d + 1 rows in one-row steps (``step_costs[0]`` is 1)."""
    best, best_gain = 0, 1.0
    emitted, term = 1.0, 1.0
    for d in range(1, min(max_drafts, len(step_costs) - 1) + 1):
        term *= acceptance_rate
        emitted += term
        gain = emitted / step_costs[d]
        if gain > best_gain:
            best, best_gain = d, gain
    return best


def linear_step_costs(max_drafts: int, row_cost: float) -> list[float]:
    return [1.0 + d * row_cost for d in range(max_drafts + 1)]


def _time_at(times: dict[int, float], m: int) -> float:
    """A kernel's time at ``m``, linear between the M the tuner measured (flat past the last)."""
    below = max((x for x in times if x <= m), default=min(times))
    above = min((x for x in times if x >= m), default=max(times))
    if above == below:
        return times[below]
    return times[below] + (times[above] - times[below]) * (m - below) / (above - below)


def tuned_step_costs(linears: Iterable[Linear], table: DataflowTable, max_drafts: int) -> list[float] | None:
    """The projections' time at M = d + 1 over their time at M = 1, for d up to ``max_drafts``, from
    the tuned table's timings of each planned kernel; None when the table did not time them all."""
    totals = [0.0] * (max_drafts + 1)
    for lin in linears:
        entry = table.shapes.get(lin.shape_key())
        for d in range(max_drafts + 1):
            times = entry.times.get(lin.candidate_at(d + 1)) if entry is not None else None
            if not times:
                return None
            totals[d] += _time_at(times, d + 1)
    if not totals[0] > 0:
        return None
    return [t / totals[0] for t in totals]


class StepCostMeter:
    """The engine's own step times on this machine, by the step's row count M: what the adaptive
    draft length prices a drafted row by once it has seen enough steps of each M. A step's first
    ``warmup`` samples at each M are dropped (lazy set-up, cold caches), and the median of the last
    ``window`` stands for it, so a step slowed by another process on the cores moves it little."""

    def __init__(self, warmup: int = 2, window: int = 31, min_samples: int = 5):
        self.warmup, self.window, self.min_samples = warmup, window, min_samples
        self._seen: dict[int, int] = {}
        self._samples: dict[int, deque[float]] = {}
        self._medians: dict[int, float] = {}

    def record(self, rows: int, seconds: float) -> None:
        seen = self._seen[rows] = self._seen.get(rows, 0) + 1
        if seen <= self.warmup:
            return
        samples = self._samples.setdefault(rows, deque(maxlen=self.window))
        samples.append(seconds)
        if len(samples) >= self.min_samples:
            self._medians[rows] = statistics.median(samples)

    def cost(self, rows: int) -> float | None:
        """The median time of a step of ``rows`` rows; None until enough were timed."""
        return self._medians.get(rows)

    def step_costs(self, prior: list[float]) -> list[float]:
        """``prior`` (costs of 1 + d rows in one-row steps), each replaced by the measured ratio
        where steps of 1 and of 1 + d rows were both timed enough; a d past a timed one is priced
        at the rows of the longest timed step below it, so that the first longer draft is tried at
        what rows cost here rather than at the prior's guess. A step of more rows does more work, so
        one timed cheaper than a timed shorter step (noise from other processes) costs as that one."""
        base = self.cost(1)
        if base is None or not base > 0:
            return prior
        costs, row_cost, floor = [prior[0]], None, 1.0
        for d, p in enumerate(prior[1:], start=1):
            measured = self.cost(d + 1)
            if measured is not None:
                floor = max(measured / base, floor)
                row_cost = (floor - 1.0) / d
            elif row_cost is not None:
                floor = max(1.0 + d * row_cost, floor)
            costs.append(p if measured is None and row_cost is None else floor)
        return costs


# how far back a lookup's match is measured: past this, a match is a copy under way however long
MATCH_LIMIT = 16


def ngram_lookup(tokens: np.ndarray, k: int, n_min: int, n_max: int) -> tuple[list[int], int]:
    """Up to ``k`` tokens that followed an earlier occurrence of the last n tokens of ``tokens``, for
    the largest n in [n_min, n_max] that occurs, and how far back that occurrence matches; ([], 0)
    when none does. Of its occurrences, the one whose match runs furthest back (up to
    ``MATCH_LIMIT`` tokens) is taken, the most recent of those: a long match is text being copied, a
    one-token match mostly chance, which is what the proposer's acceptance rate by match length
    weighs.

    One pass serves every n: the earlier tokens equal to the last one are where an occurrence of any
    n-gram suffix ends, and how far back each goes on matching decides both the largest n that occurs
    (the longest match, up to n_max) and which occurrence is taken (the longest, of all those that
    hold that n-gram). The lookup runs once a decode step, so its few array operations matter."""
    n_max = min(n_max, len(tokens) - 1)
    if n_max < n_min:
        return [], 0
    # ends of occurrences with at least one token after them
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])
    if not ends.size:
        return [], 0
    matched = _match_lengths(tokens, ends, max(n_max, MATCH_LIMIT))
    longest = int(matched.max())
    if min(longest, n_max) < n_min:
        return [], 0
    best = np.flatnonzero(matched == longest)[-1]
    follow = ends[best] + 1
    return tokens[follow : follow + k].tolist(), longest


def _match_lengths(tokens: np.ndarray, ends: np.ndarray, limit: int) -> np.ndarray:
    """How many tokens, up to ``limit``, each occurrence of the last token at ``ends`` matches the
    tokens' end going back from there (1: the token alone)."""
    last = len(tokens) - 1
    lengths = np.ones(ends.shape, dtype=np.int64)
    alive = np.ones(ends.shape, dtype=bool)
    for back in range(1, limit):
        alive &= ends - back >= 0
        alive[alive] = tokens[ends[alive] - back] == tokens[last - back]
        if not alive.any():
            break
        lengths += alive
    return lengths


class _TokenArray:
    """A sequence's tokens as a numpy array, grown by the new tokens only: its tokens are only ever
    appended to (rejected drafts never enter them), so each step copies what the last one added."""

    def __init__(self) -> None:
        self.buffer = np.empty(256, dtype=np.int64)
        self.size = 0

    def view(self, tokens: list[int]) -> np.ndarray:
        n = len(tokens)
        if n > len(self.buffer):
            grown = np.empty(max(n, 2 * len(self.buffer)), dtype=np.int64)
            grown[: self.size] = self.buffer[: self.size]
            self.buffer = grown
        if n > self.size:
            self.buffer[self.size : n] = tokens[self.size : n]
            self.size = n
        return self.buffer[:n]


class AdaptiveProposer(abc.ABC):
    """The scheduler's proposer (engine/scheduler.py's ``Proposer``): while it schedules, how many
    drafts each decoding sequence may take (``num_drafts``, at most what pays at its acceptance
    rate); once every sequence has its blocks, the drafts themselves (``propose``), so that a draft
    model drafts for all of them in one batch."""

    def __init__(
        self,
        config: SpeculativeConfig,
        max_model_len: int,
        prior_costs: list[float] | None = None,
        meter: StepCostMeter | None = None,
    ):
        """``prior_costs``: a step's cost at 1 + d rows, d = 0..num_speculative_tokens, in one-row
        steps, until ``meter`` (the engine's timings of its steps) has measured them
        (``tuned_step_costs``; None: ``linear_step_costs`` of ``config.draft_row_cost``); no
        ``meter``: the prior alone."""
        self.config = config
        self.max_model_len = max_model_len
        k = config.num_speculative_tokens
        self.prior_costs = prior_costs or linear_step_costs(k, config.draft_row_cost)
        self.meter = meter

    def step_costs(self) -> list[float]:
        """A sequence's step cost at 1 + d rows over one row: measured where timed, else the prior."""
        return self.prior_costs if self.meter is None else self.meter.step_costs(self.prior_costs)

    def draft_limit(self, seq: Sequence, budget: int) -> int:
        """The most drafts ``seq`` may take this step: within ``budget`` and its limits."""
        if seq.matcher is not None:
            return 0  # a grammar's mask at each drafted position would need the grammar advanced
        limit = min(budget, self.config.num_speculative_tokens, self.max_model_len - seq.num_tokens - 1)
        if seq.params.max_tokens is not None:
            limit = min(limit, seq.params.max_tokens - seq.num_output_tokens - 1)
        return limit

    def draft_length(self, seq: Sequence, budget: int) -> int:
        """The most drafts ``seq`` should take this step: within its limit, what pays at its
        acceptance rate."""
        limit = self.draft_limit(seq, budget)
        return best_draft_length(seq.draft_history.acceptance_rate, limit, self.step_costs())

    def num_drafts(self, seq: Sequence, budget: int) -> int:
        return self.draft_length(seq, budget)

    @abc.abstractmethod
    def propose(self, batch: ScheduledBatch, drafting: list[tuple[Sequence, int]]) -> None:
        """Set ``spec_token_ids`` (d tokens) of each (sequence, d) of ``batch`` that ``num_drafts``
        gave d, once the step's blocks are allocated."""


class MatchHistory:
    """A sequence's n-gram drafts by the length of the match they came from, in classes 1, 2-3, 4-7,
    8-15 and 16 or more tokens: a copy under way matches far back and is accepted almost always, a
    one-token match seldom, so one rate for both drafts the first too little and the second too
    much. Each draft is a trial until the first rejection (the drafts after it were never tested),
    each class's counts decayed by ``decay`` per step it drafts in; the prior counts a match of m
    tokens as accepted m / (m + 1) of ``prior_trials``."""

    def __init__(self, decay: float = 0.9, prior_trials: float = 2.0):
        self.decay, self.prior_trials = decay, prior_trials
        self.accepted = [0.0] * (_MATCH_CLASSES + 1)
        self.trials = [0.0] * (_MATCH_CLASSES + 1)

    @staticmethod
    def match_class(matched: int) -> int:
        return min(matched.bit_length(), _MATCH_CLASSES)

    def acceptance_rate(self, matched: int) -> float:
        c = self.match_class(matched)
        shortest = 1 << (c - 1)
        prior = self.prior_trials * shortest / (shortest + 1)
        return (self.accepted[c] + prior) / (self.trials[c] + self.prior_trials)

    def record(self, matched: int, drafted: int, accepted: int) -> None:
        c = self.match_class(matched)
        self.accepted[c] = self.decay * self.accepted[c] + accepted
        self.trials[c] = self.decay * self.trials[c] + accepted + (accepted < drafted)


_MATCH_CLASSES = MATCH_LIMIT.bit_length()


class NgramProposer(AdaptiveProposer):
    """Drafts by ``ngram_lookup``, as many of the found tokens as pay at the sequence's acceptance
    rate for matches as long as this one (``MatchHistory``); a step's outcome is read off the
    sequence's tokens when it next drafts."""

    def __init__(
        self,
        config: SpeculativeConfig,
        max_model_len: int,
        prior_costs: list[float] | None = None,
        meter: StepCostMeter | None = None,
    ):
        super().__init__(config, max_model_len, prior_costs, meter)
        # each sequence's tokens as an array and its drafts' history, dropped with the sequence
        self._arrays: weakref.WeakKeyDictionary[Sequence, _TokenArray] = weakref.WeakKeyDictionary()
        self._histories: weakref.WeakKeyDictionary[Sequence, MatchHistory] = weakref.WeakKeyDictionary()
        # each sequence's drafts in flight: (match length, drafts, the position of the first)
        self._pending: weakref.WeakKeyDictionary[Sequence, tuple[int, list[int], int]] = (
            weakref.WeakKeyDictionary()
        )
        self._found: dict[Sequence, tuple[int, list[int]]] = {}  # this step's lookups, until propose

    def num_drafts(self, seq: Sequence, budget: int) -> int:
        """The drafts that pay of what the lookup found: a sequence takes blocks and budget only
        for those."""
        history = self._history(seq)
        limit = self.draft_limit(seq, budget)
        if limit <= 0:
            return 0
        array = self._arrays.get(seq)
        if array is None:
            array = self._arrays[seq] = _TokenArray()
        cfg = self.config
        found, matched = ngram_lookup(
            array.view(seq.token_ids), limit, cfg.prompt_lookup_min, cfg.prompt_lookup_max
        )
        d = best_draft_length(history.acceptance_rate(matched), len(found), self.step_costs()) if found else 0
        self._found[seq] = (matched, found[:d])
        return d

    def _history(self, seq: Sequence) -> MatchHistory:
        """``seq``'s history, with its last drafts' outcome recorded: the accepted ones are the
        tokens it now holds at their positions (a rejected draft's row emits another token)."""
        history = self._histories.get(seq)
        if history is None:
            history = self._histories[seq] = MatchHistory()
        pending = self._pending.pop(seq, None)
        if pending is not None:
            matched, drafts, first = pending
            held = seq.token_ids[first : first + len(drafts)]
            accepted = next((i for i, (a, b) in enumerate(zip(drafts, held)) if a != b), len(held))
            history.record(matched, len(drafts), accepted)
        return history

    def propose(self, batch: ScheduledBatch, drafting: list[tuple[Sequence, int]]) -> None:
        for seq, d in drafting:
            matched, found = self._found[seq]
            seq.spec_token_ids = found[:d]
            self._pending[seq] = (matched, seq.spec_token_ids, seq.num_tokens)
        self._found.clear()


class DraftModelProposer(AdaptiveProposer):
    """Drafts from a smaller model with the target's vocabulary, for every drafting sequence at once,
    one token per pass: pass j feeds each sequence's token at position num_tokens - 1 + j (its last
    token, then its drafts) and samples the next draft from the draft's distribution q under the
    sequence's own sampling parameters (``Sampler.draft``), which verification's rejection rule
    needs. Its K/V sits in the draft's cache, in the sequence's own blocks: pass 0 also runs the
    step's other rows (decodes that do not draft, prefill chunks) and a last pass feeds the last
    draft, so the draft computes every position the target's step computes; whatever the target's
    cache holds (a prefix-cache hit, a recompute after preemption) the draft's holds too, and a
    rejected draft's slot is overwritten, or its block freed, with the target's."""

    def __init__(
        self,
        config: SpeculativeConfig,
        max_model_len: int,
        prior_costs: list[float],
        prior_ratio: float,
        runner: ModelRunner,
        sampler: Sampler,
        sampling_row: Callable[[Sequence, list[int]], SamplingRow],
        vocab_size: int,
        meter: StepCostMeter | None = None,
    ):
        """``prior_costs``: the target's step costs (``AdaptiveProposer``); ``prior_ratio``: a draft
        row's cost over a target row's until both were timed (``weight_bytes_ratio``); ``runner``:
        the draft model's (engine/model_runner.py); ``sampling_row``: the sampling state of a
        sequence with the given output tokens (the engine's); ``vocab_size``: the target's logits
        width, which q must have."""
        super().__init__(config, max_model_len, prior_costs, meter)
        self.prior_ratio = prior_ratio
        self.draft_meter = StepCostMeter()  # the draft's passes, timed as the engine times its steps
        self.runner = runner
        self.sampler = sampler
        self.sampling_row = sampling_row
        self.vocab_size = vocab_size

    def step_costs(self) -> list[float]:
        return draft_step_costs(super().step_costs(), self.draft_ratio())

    def draft_ratio(self) -> float:
        """A one-row draft pass's measured time over a one-row target step's, else the prior."""
        draft = self.draft_meter.cost(1)
        target = None if self.meter is None else self.meter.cost(1)
        if self.meter is None or draft is None or not target:
            return self.prior_ratio
        return draft / target

    def propose(self, batch: ScheduledBatch, drafting: list[tuple[Sequence, int]]) -> None:
        if not batch:
            return
        start = time.perf_counter()
        hidden = self.runner.forward(batch)  # every decode's row first, in batch order
        rows = {seq: i for i, seq in enumerate(batch.decodes)}
        self._sample([seq for seq, _ in drafting], hidden[[rows[seq] for seq, _ in drafting]])
        if not batch.prefills:
            self.draft_meter.record(len(batch.decodes), time.perf_counter() - start)
        for j in range(1, max((d for _, d in drafting), default=0) + 1):
            # each sequence's draft j at its position; those with more drafts to go sample the next
            start = time.perf_counter()
            fed = [(seq, d) for seq, d in drafting if d >= j]
            seqs = [seq for seq, _ in fed]
            positions = [seq.num_tokens - 1 + j for seq in seqs]
            hidden = self.runner.decode(seqs, [seq.spec_token_ids[j - 1] for seq in seqs], positions)
            more = [i for i, (_, d) in enumerate(fed) if d > j]
            self._sample([seqs[i] for i in more], hidden[more])
            self.draft_meter.record(len(seqs), time.perf_counter() - start)

    def _sample(self, seqs: list[Sequence], hidden: torch.Tensor) -> None:
        """Each sequence's next draft, from the draft's ``hidden`` row of its last token or draft."""
        if not seqs:
            return
        rows = [self.sampling_row(seq, seq.output_token_ids + seq.spec_token_ids) for seq in seqs]
        token_ids, probs = self.sampler.draft(self._target_width(self.runner.logits(hidden)), rows)
        for seq, token, q in zip(seqs, token_ids, probs):
            seq.spec_token_ids.append(token)
            seq.spec_draft_probs.append(q)

    def _target_width(self, logits: torch.Tensor) -> torch.Tensor:
        """The draft's logits over the target's vocabulary: the models share their tokens, and
        only their embeddings' padding past them may differ (padding is never drafted)."""
        width = self.vocab_size
        if logits.shape[1] >= width:
            return logits[:, :width]
        return torch.nn.functional.pad(logits, (0, width - logits.shape[1]), value=float("-inf"))


def draft_step_costs(target_costs: list[float], draft_ratio: float) -> list[float]:
    """A sequence's step with d drafts from a draft model, over its step without: the target's
    d + 1 rows and the draft's d + 1 one-row passes, against one target row and the draft's one row
    (which runs either way, to keep the draft's cache whole); ``draft_ratio``: a draft row's cost
    over a target row's."""
    return [(cost + (d + 1) * draft_ratio) / (1.0 + draft_ratio) for d, cost in enumerate(target_costs)]


def weight_bytes_ratio(draft: Iterable[Linear], target: Iterable[Linear]) -> float:
    """The draft's stored projection bytes over the target's: what a decode row of each reads, so
    roughly its cost where reading the weights bounds a step."""

    def total(linears: Iterable[Linear]) -> float:
        return sum(math.prod(lin.shape) * bytes_per_weight(lin.format) for lin in linears)

    return total(draft) / total(target)
