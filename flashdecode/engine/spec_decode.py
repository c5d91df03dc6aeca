"""Speculative decoding by n-gram prompt lookup: cheap drafts, verified in the step that decodes.

Each step, a decoding sequence may draft up to ``num_speculative_tokens`` tokens: the tokens that
followed the most recent earlier occurrence of its last n tokens in its prompt and output (n from
``prompt_lookup_max`` down to ``prompt_lookup_min``), as vLLM's and llama.cpp's prompt lookup do.
Input-grounded work (summaries, edits, answers from a passage) repeats its input, so the drafts are
often right.

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
drafted (zero when no length beats plain decoding). The cost of d + 1 rows, in one-row steps, comes
from the tuned dataflow table where it timed every projection of the model (``tuned_step_costs``:
each shape's planned kernel at each M; attention, which reads the context once per row, is left
out), else it is ``1 + d * draft_row_cost``. The rate
is the sequence's own (``Sequence.draft_history``), over its recent steps.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..config import SpeculativeConfig
from ..layers.dataflow import DataflowTable
from ..layers.linear import Linear
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


def ngram_lookup(tokens: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of the last n tokens of
    ``tokens``, for the largest n in [n_min, n_max] that occurs; [] when none does."""
    length = len(tokens)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        pattern = tokens[length - n :]
        # occurrences start at i <= length - n - 1, so at least one token follows each
        starts = np.flatnonzero(tokens[: length - n] == pattern[0])
        if n > 1 and starts.size:
            windows = sliding_window_view(tokens, n)[starts]
            starts = starts[(windows == pattern).all(axis=1)]
        if starts.size:
            follow = starts[-1] + n
            return tokens[follow : follow + k].tolist()
    return []


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


class NgramProposer:
    def __init__(self, config: SpeculativeConfig, max_model_len: int, step_costs: list[float] | None = None):
        """``step_costs``: a step's cost at 1 + d rows, d = 0..num_speculative_tokens, in one-row
        steps (``tuned_step_costs``); None: ``linear_step_costs`` of ``config.draft_row_cost``."""
        self.config = config
        self.max_model_len = max_model_len
        k = config.num_speculative_tokens
        self.step_costs = step_costs or linear_step_costs(k, config.draft_row_cost)
        # each sequence's tokens as an array, dropped with the sequence
        self._arrays: weakref.WeakKeyDictionary[Sequence, _TokenArray] = weakref.WeakKeyDictionary()

    def propose(self, seq: Sequence, budget: int) -> list[int]:
        """The drafts of decoding sequence ``seq`` this step, at most ``budget`` of them."""
        if seq.matcher is not None:
            return []  # a grammar's mask at each drafted position would need the grammar advanced
        cfg = self.config
        limit = min(budget, cfg.num_speculative_tokens, self.max_model_len - seq.num_tokens - 1)
        if seq.params.max_tokens is not None:
            limit = min(limit, seq.params.max_tokens - seq.num_output_tokens - 1)
        limit = best_draft_length(seq.draft_history.acceptance_rate, limit, self.step_costs)
        if limit <= 0:
            return []
        array = self._arrays.get(seq)
        if array is None:
            array = self._arrays[seq] = _TokenArray()
        tokens = array.view(seq.token_ids)
        return ngram_lookup(tokens, limit, cfg.prompt_lookup_min, cfg.prompt_lookup_max)
