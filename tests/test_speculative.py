"""Speculative decoding by n-gram prompt lookup (engine/spec_decode.py): the same greedy tokens as plain
decoding, the target's distribution when sampling, and a block pool that never leaks a rejected draft.

Plain decoding is the reference for greedy output (itself held to transformers by test_hf_parity.py);
transformers is the reference for the sampled distribution; hand arithmetic for the lookup and the
adaptive draft length."""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashdecode import LLM, SamplingParams
from flashdecode.config import EngineConfig, SpeculativeConfig
from flashdecode.engine.block_manager import chain_hash
from flashdecode.engine.llm_engine import LLMEngine
from flashdecode.engine.sampler import Sampler, SamplingRow
from flashdecode.engine.scheduler import ScheduledBatch
from flashdecode.engine.sequence import DraftHistory
from flashdecode.engine.spec_decode import (
    MATCH_LIMIT,
    DraftModelProposer,
    MatchHistory,
    NgramProposer,
    StepCostMeter,
    _TokenArray,
    best_draft_length,
    linear_step_costs,
    ngram_lookup,
    tuned_step_costs,
)
from flashdecode.entrypoints.cli import speculative_json
from flashdecode.errors import FlashDecodeError
from flashdecode.layers.dataflow import DataflowTable, ShapeResult
from flashdecode.layers.kv_cache import KVCache
from flashdecode.layers.linear import iter_linears

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}

# text that repeats itself, so prompt lookup finds drafts the model agrees with
REPETITIVE = [
    "The cat sat on the mat. The dog sat on the log. The cat sat on the mat. The dog sat on the",
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n",
    "Copy this list exactly: apple, banana, cherry, date, elderberry, fig. Copy: apple, banana,",
]
OPEN_ENDED = "Write one sentence about the sea."


# --- the lookup and the draft length, by hand ----------------------------------------------------


def test_ngram_lookup_takes_the_most_recent_longest_match() -> None:
    tokens = np.array([1, 2, 3, 9, 8, 1, 2, 3, 7, 6, 5, 1, 2, 3])
    # [1, 2, 3] occurs at 0 and 5, neither matching further back (8 before 5, 5 before the suffix):
    # the most recent (5) is followed by 7, 6, 5, a three-token match
    assert ngram_lookup(tokens, 3, 1, 3) == ([7, 6, 5], 3)
    assert ngram_lookup(tokens, 10, 1, 3) == ([7, 6, 5, 1, 2, 3], 3)  # all k that follow, up to the end
    # [4, 2] never occurred earlier, so n = 1 takes the earlier 2 (position 0): one token matched
    assert ngram_lookup(np.array([2, 3, 9, 4, 2]), 2, 1, 2) == ([3, 9], 1)
    assert ngram_lookup(np.array([2, 3, 9, 4, 2]), 2, 2, 2) == ([], 0)  # n >= 2 only: no match


def test_ngram_lookup_prefers_the_match_that_runs_furthest_back() -> None:
    # [1, 2, 3] occurs at 1 (after 5, as the suffix is) and at 6 (after 4): the earlier one matches
    # four tokens, so it wins; n-gram length 3 alone would have taken the later one
    tokens = np.array([5, 1, 2, 3, 9, 4, 1, 2, 3, 8, 7, 7, 5, 1, 2, 3])
    assert ngram_lookup(tokens, 4, 1, 3) == ([9, 4, 1, 2], 4)
    assert ngram_lookup(tokens, 2, 1, 3) == ([9, 4], 4)  # never more than k
    # a copy under way: the suffix matches six tokens back
    text = np.array([10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 0, 10, 11, 12, 13, 14, 15])
    assert ngram_lookup(text, 4, 1, 2) == ([16, 17, 18, 19], 6)


def slow_ngram_lookup(tokens: list[int], k: int, n_min: int, n_max: int) -> tuple[list[int], int]:
    """The lookup as its docstring says it, n by n and occurrence by occurrence."""
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        suffix = tokens[len(tokens) - n :]
        best, best_len = None, 0
        for i in range(len(tokens) - n):  # an occurrence with a token after it
            if tokens[i : i + n] != suffix:
                continue
            length = n
            while length < max(n, MATCH_LIMIT) and i - (length - n) - 1 >= 0:
                if tokens[i - (length - n) - 1] != tokens[len(tokens) - length - 1]:
                    break
                length += 1
            if length >= best_len:
                best, best_len = i, length
        if best is not None:
            return tokens[best + n : best + n + k], best_len
    return [], 0


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 4), min_size=1, max_size=60),
    st.integers(1, 9),
    st.integers(1, 3),
    st.integers(0, 3),
)
def test_ngram_lookup_is_its_definition(tokens: list[int], k: int, n_min: int, extra: int) -> None:
    """The one-pass lookup returns what the n-by-n search of its definition finds, on short
    alphabets (many repeats, overlapping and self-similar matches)."""
    want = slow_ngram_lookup(tokens, k, n_min, n_min + extra)
    assert ngram_lookup(np.array(tokens), k, n_min, n_min + extra) == want
    # a long copy's match is measured MATCH_LIMIT back, no further
    copy = np.array([*range(100, 140), 0, *range(100, 130)])
    assert ngram_lookup(copy, 3, 1, 2) == ([130, 131, 132], MATCH_LIMIT)
    assert ngram_lookup(np.array([5, 6, 7]), 3, 1, 3) == ([], 0)  # nothing repeats
    assert ngram_lookup(np.array([5]), 3, 1, 3) == ([], 0)


def test_match_history_rates_each_match_length_apart() -> None:
    history = MatchHistory()
    # the prior: a match of m tokens (its class's shortest) accepted m / (m + 1) of the time
    assert [history.acceptance_rate(m) for m in (1, 2, 3, 4, 8, 40)] == pytest.approx(
        [1 / 2, 2 / 3, 2 / 3, 4 / 5, 8 / 9, 16 / 17]
    )
    history.record(1, 4, 0)  # four drafts rejected at the first: one trial, not four
    assert history.acceptance_rate(1) == pytest.approx(1 / 3)
    history.record(20, 4, 2)  # two accepted, then the third rejected: three trials
    assert history.acceptance_rate(16) == pytest.approx((2 + 2 * 16 / 17) / (3 + 2))
    history.record(20, 4, 4)  # all four accepted: four trials, none failed
    assert history.acceptance_rate(16) == pytest.approx((0.9 * 2 + 4 + 2 * 16 / 17) / (0.9 * 3 + 4 + 2))
    assert history.acceptance_rate(1) == pytest.approx(1 / 3)  # the other classes untouched


class _Decoding:
    """What the n-gram proposer reads of a decoding sequence."""

    def __init__(self, token_ids: list[int]):
        self.token_ids, self.spec_token_ids = token_ids, []
        self.matcher, self.params, self.num_output_tokens = None, SamplingParams(), 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def _draft(proposer: NgramProposer, seq: Any) -> list[int]:
    d = proposer.num_drafts(seq, 64)
    proposer.propose(ScheduledBatch(), [(seq, d)] if d else [])
    return list(seq.spec_token_ids) if d else []


def test_ngram_proposer_drafts_long_copies_and_stops_on_chance_matches() -> None:
    # the default prior's 0.4 a row: d drafts at rate a give (1 + a + ... + a^d) / (1 + 0.4 d)
    proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=8), 4096)
    passage = list(range(100, 140))
    copying = _Decoding([*passage, 0, *passage[:20]])
    # a copy under way: the match runs MATCH_LIMIT back, prior rate 16/17, where 6 drafts pay best
    # (7.02 / 3.4 = 2.06 tokens a cost against 6.53 / 3.0 = 2.18 for 5 and 7.43 / 3.8 for 7)
    assert _draft(proposer, copying) == passage[20:26]
    copying.token_ids += passage[20:27]  # all accepted, and the bonus token
    # six of six accepted: rate (6 + 2 * 16/17) / 8 = 0.985, and the longest draft allowed pays
    assert _draft(proposer, copying) == passage[27:35]
    # a one-token match elsewhere (prior rate 1/2): one draft pays (1.5 / 1.4), two do not
    chance = _Decoding([7, 1, 2, 3, 4, 5, 6, 8, 7])
    assert _draft(proposer, chance) == [1]
    chance.token_ids += [9, 10, 7]  # rejected (9), then another one-token match of 7
    # one trial, failed: rate 1/3, where no draft pays (1.33 / 1.4), while the copy's class drafts on
    assert proposer.num_drafts(chance, 64) == 0
    copying.token_ids += passage[35:38]  # two of eight accepted, then the bonus token
    assert len(_draft(proposer, copying)) > 0


def test_token_array_follows_the_appended_tokens() -> None:
    array, tokens = _TokenArray(), [3, 1, 4]
    assert array.view(tokens).tolist() == tokens
    for grow in (1, 300, 2, 700):  # past the first buffer and past doubling it
        tokens += list(range(grow))
        assert array.view(tokens).tolist() == tokens


def test_best_draft_length_maximises_tokens_per_cost() -> None:
    costs = linear_step_costs(8, 0.1)
    assert costs[:3] == pytest.approx([1.0, 1.1, 1.2])
    # rate 0.5, row cost 0.1: d=1 -> 1.5/1.1 = 1.364, d=2 -> 1.75/1.2 = 1.458, d=3 -> 1.875/1.3 = 1.442
    assert best_draft_length(0.5, 8, costs) == 2
    assert best_draft_length(0.5, 1, costs) == 1
    # rate 0.05, row cost 0.1: d=1 -> 1.05/1.1 < 1: plain decoding pays better
    assert best_draft_length(0.05, 8, costs) == 0
    assert best_draft_length(1.0, 6, costs) == 6  # every draft accepted: the most allowed
    assert best_draft_length(1.0, 20, costs) == 8  # never past the costs known
    assert best_draft_length(0.9, 0, costs) == 0
    # rate 0.5 where a second row costs as much as a step: nothing pays; where it is free: all of it
    assert best_draft_length(0.5, 4, [1.0, 2.0, 3.0, 4.0, 5.0]) == 0
    assert best_draft_length(0.5, 4, [1.0] * 5) == 4


def _timed(meter: StepCostMeter, seconds_at: dict[int, float], n: int = 10) -> StepCostMeter:
    """``meter`` fed ``n`` steps at each row count, each taking the given time."""
    for _ in range(n):
        for rows, seconds in seconds_at.items():
            meter.record(rows, seconds)
    return meter


def test_step_cost_meter_takes_the_median_after_warm_up() -> None:
    meter = StepCostMeter(warmup=2, window=5, min_samples=3)
    for seconds in (9.0, 9.0, 1.0, 1.2):  # two warm-up steps dropped, then too few to count
        meter.record(1, seconds)
    assert meter.cost(1) is None
    meter.record(1, 50.0)  # an outlier: a step slowed by another process
    assert meter.cost(1) == 1.2  # the median of 1.0, 1.2, 50.0
    for seconds in (1.1, 1.3, 1.1):
        meter.record(1, seconds)
    assert meter.cost(1) == 1.2  # the last 5: 1.2, 50.0, 1.1, 1.3, 1.1
    prior = [1.0, 1.4, 1.8]
    assert meter.step_costs(prior) == prior  # no row count past 1 timed: the prior
    _timed(meter, {3: 1.5})
    assert meter.step_costs(prior) == pytest.approx([1.0, 1.4, 1.5 / 1.2])
    # past the longest timed step, rows cost what its rows did: (1.25 - 1) / 2 a row, not the prior's
    assert meter.step_costs([*prior, 2.2, 2.6]) == pytest.approx([1.0, 1.4, 1.25, 1.375, 1.5])
    # timed cheaper than fewer rows (noise): as dear as the fewer rows, never a cheap long draft
    _timed(meter, {2: 1.8, 4: 1.44})
    # (1.5 for 2 rows; 3 and 4 timed at 1.25 and 1.2 cost 1.5; 5 rows at 4 rows' (1.5 - 1) / 3 a row)
    assert meter.step_costs([*prior, 2.2, 2.6]) == pytest.approx([1.0, 1.5, 1.5, 1.5, 1 + 4 * 0.5 / 3])


def _gain(rate: float, d: int, costs: list[float]) -> float:
    """Tokens per step cost with d drafts over plain decoding's: (1 + a + ... + a^d) / cost."""
    return sum(rate**i for i in range(d + 1)) / costs[d]


def test_measured_costs_draft_more_when_rows_are_cheap_and_none_when_dear() -> None:
    config = SpeculativeConfig(num_speculative_tokens=4)
    proposer = NgramProposer(config, 1024, meter=StepCostMeter())
    assert proposer.step_costs() == pytest.approx([1.0, 1.4, 1.8, 2.2, 2.6])  # the prior until timed
    # the prior's 0.4 a row: at rate 0.5 one draft (1.5 / 1.4) pays, more do not
    assert best_draft_length(0.5, 4, proposer.step_costs()) == 1
    # weights read once per step: five rows cost barely more than one
    _timed(proposer.meter, {1: 10e-3, 2: 10.2e-3, 3: 10.4e-3, 4: 10.6e-3, 5: 10.8e-3})
    cheap = proposer.step_costs()
    assert cheap == pytest.approx([1.0, 1.02, 1.04, 1.06, 1.08])
    assert best_draft_length(0.5, 4, cheap) == 4
    # compute-bound rows: each costs as much as a step; nothing pays even at rate 0.9
    dear = _timed(StepCostMeter(), {m: m * 10e-3 for m in range(1, 6)}).step_costs(proposer.prior_costs)
    assert dear == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0])
    assert best_draft_length(0.9, 4, dear) == 0
    # whatever the costs, a length that is drafted beats plain decoding at that acceptance rate
    for costs in (cheap, dear, proposer.prior_costs):
        for rate in np.linspace(0.0, 1.0, 21):
            d = best_draft_length(rate, 4, costs)
            assert d == 0 or _gain(rate, d, costs) > 1.0
        assert best_draft_length(0.0, 4, costs) == 0


def test_draft_model_passes_priced_by_their_timings() -> None:
    config = SpeculativeConfig(method="draft", model="draft.gguf", num_speculative_tokens=2)
    meter = StepCostMeter()
    proposer = DraftModelProposer(config, 1024, [1.0, 1.1, 1.2], 0.5, None, None, None, 8, meter)
    # before timings: the weight bytes' ratio 0.5; d drafts: (cost + (d + 1) * 0.5) / 1.5
    assert proposer.step_costs() == pytest.approx([1.0, 2.1 / 1.5, 2.7 / 1.5])
    _timed(meter, {1: 10e-3, 2: 10e-3, 3: 10e-3})
    _timed(proposer.draft_meter, {1: 1e-3})  # a draft pass a tenth of a target step
    assert proposer.draft_ratio() == pytest.approx(0.1)
    assert proposer.step_costs() == pytest.approx([1.0, 1.2 / 1.1, 1.3 / 1.1])


def test_draft_history_stops_and_resumes_drafting() -> None:
    history, costs = DraftHistory(), linear_step_costs(4, 0.1)
    assert history.acceptance_rate == 0.5  # the prior: try drafting
    assert best_draft_length(history.acceptance_rate, 4, costs) > 0
    for _ in range(5):
        history.record(4, 0)  # nothing accepted: 1 / (2 + 4 * (1 + 0.9 + ... + 0.9^4)) = 0.054
    assert history.acceptance_rate == pytest.approx(1 / (2 + 4 * 4.0951))
    assert best_draft_length(history.acceptance_rate, 4, costs) == 0
    for _ in range(30):
        history.record(0, 0)  # steps without drafts: the evidence fades back toward the prior
    assert history.acceptance_rate == pytest.approx(1 / (2 + 4 * 4.0951 * 0.9**30))
    assert best_draft_length(history.acceptance_rate, 4, costs) > 0


# --- configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"method": "eagle"},
        {"num_speculative_tokens": 0},
        {"num_speculative_tokens": True},
        {"prompt_lookup_min": 4, "prompt_lookup_max": 2},
        {"prompt_lookup_max": 0},
        {"draft_row_cost": -0.5},
        {"lookahead": 3},
    ],
)
def test_bad_speculative_config_is_a_clear_error(bad: dict[str, Any]) -> None:
    with pytest.raises(FlashDecodeError, match="speculative"):
        SpeculativeConfig.of({**NGRAM, **bad})


def test_speculative_config_from_dict_and_cli_json() -> None:
    cfg = SpeculativeConfig.of(speculative_json('{"method": "ngram", "num_speculative_tokens": 2}'))
    assert (cfg.method, cfg.num_speculative_tokens, cfg.prompt_lookup_max) == ("ngram", 2, 3)
    with pytest.raises(argparse.ArgumentTypeError):
        speculative_json("[1, 2]")
    with pytest.raises(argparse.ArgumentTypeError):
        speculative_json("{method: ngram}")
    with pytest.raises(FlashDecodeError, match="speculative must be a dict"):
        SpeculativeConfig.of("ngram")


def test_serve_passes_the_speculative_option_to_the_engine() -> None:
    from flashdecode.entrypoints.server import serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--speculative", '{"num_speculative_tokens": 2, "prompt_lookup_max": 2}'])
    config = serve.engine_config(args).speculative
    assert isinstance(config, SpeculativeConfig)
    assert (config.num_speculative_tokens, config.prompt_lookup_max) == (2, 2)
    assert serve.engine_config(parser.parse_args([])).speculative is None


# --- the embedded model: greedy equality, logprobs, stops, verification logits -------------------------


@pytest.fixture(scope="module")
def embedded() -> tuple[LLM, LLM]:
    options = dict(max_model_len=512, numerics="exact", max_num_seqs=8)
    return LLM(**options), LLM(**options, speculative=NGRAM)


def _tokens(outs: list[Any]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_equals_plain_decoding_on_the_embedded_model(embedded: tuple[LLM, LLM]) -> None:
    plain, spec = embedded
    before = spec.stats()
    # one batch: repetitive prompts that draft, an open-ended one that rarely does, one with logprobs
    prompts = [*REPETITIVE, OPEN_ENDED]
    params = [SamplingParams(temperature=0, max_tokens=28, ignore_eos=True)] * 3 + [
        SamplingParams(temperature=0, max_tokens=24, logprobs=2)
    ]
    expected, got = plain.generate(prompts, params), spec.generate(prompts, params)
    assert _tokens(got) == _tokens(expected)
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in expected]
    for e, g in zip(expected[3].outputs[0].logprobs, got[3].outputs[0].logprobs):
        assert e.keys() == g.keys()
        for token in e:
            assert g[token].rank == e[token].rank
            assert math.isclose(g[token].logprob, e[token].logprob, abs_tol=2e-4)
    after = spec.stats()
    drafted = after.spec_num_draft_tokens - before.spec_num_draft_tokens
    accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    assert drafted > 0 and accepted > 0, (drafted, accepted)
    assert after.spec_acceptance_rate > 0 and after.spec_mean_accepted_length > 1
    assert after.kv_blocks_free == after.kv_blocks_total


def test_the_engine_meters_each_step_by_its_own_duration(embedded: tuple[LLM, LLM]) -> None:
    """The meter's samples are the steps' durations: together no longer than the requests took (a
    step timed from the wrong start reads the clock's absolute value, far longer)."""
    _, spec = embedded
    meter = spec.engine.step_meter
    recorded: list[float] = []
    record = meter.record
    meter.record = lambda rows, seconds: (recorded.append(seconds), record(rows, seconds))[1]
    try:
        start = time.perf_counter()
        spec.generate(REPETITIVE[0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
        elapsed = time.perf_counter() - start
    finally:
        del meter.record
    assert len(recorded) >= 3
    assert 0 < sum(recorded) <= elapsed


def test_stops_and_max_tokens_end_where_plain_decoding_does(embedded: tuple[LLM, LLM]) -> None:
    plain, spec = embedded
    prompt = REPETITIVE[0]
    full = plain.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    # a stop string and a stop id from inside the greedy text, where drafts run
    stop_text = full.text[len(full.text) // 2 :][:5]
    stop_id = full.token_ids[len(full.token_ids) // 2]
    cases = [
        SamplingParams(temperature=0, max_tokens=24, stop=[stop_text]),
        SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_id]),
        *(SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (2, 13)),
        SamplingParams(temperature=0, max_tokens=20, min_tokens=12),
    ]
    accepted = spec.stats().spec_num_accepted_tokens
    expected, got = plain.generate([prompt] * len(cases), cases), spec.generate([prompt] * len(cases), cases)
    assert spec.stats().spec_num_accepted_tokens > accepted  # drafts ran into the stops and limits
    for e, g, p in zip(expected, got, cases):
        e, g = e.outputs[0], g.outputs[0]
        assert (g.token_ids, g.text, g.finish_reason, g.stop_reason) == (
            e.token_ids,
            e.text,
            e.finish_reason,
            e.stop_reason,
        ), p
        assert len(g.token_ids) <= p.max_tokens
    assert expected[0].outputs[0].finish_reason == "stop"
    assert expected[1].outputs[0].stop_reason == stop_id


def _step_logits(engine: LLMEngine, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Plain greedy decoding, one token per step: the tokens and each step's logits row."""
    rows: list[torch.Tensor] = []
    run = engine.runner.run

    def recording(batch: ScheduledBatch) -> Any:
        result = run(batch)
        rows.append(result.logits[0].clone())
        return result

    engine.runner.run = recording
    try:
        engine.add_request(
            "ref", {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=steps)
        )
        while engine.has_unfinished_requests():
            out = engine.step()
    finally:
        engine.runner.run = run
    return out[0].outputs[0].token_ids, rows


def test_verification_rows_equal_plain_decoding_logits(embedded: tuple[LLM, LLM]) -> None:
    """The d + 1 rows of a verified sequence give the logits plain decoding gives at each position, as a
    pure decode batch (the native step, where built) and beside a prefill chunk (the Python layers)."""
    engine = embedded[0].engine
    prompt = engine.tokenizer.encode(REPETITIVE[1])
    tokens, reference = _step_logits(engine, prompt, 5)
    for with_prefill in (False, True):
        request = engine.add_request(
            f"verify-{with_prefill}", {"prompt_token_ids": prompt}, SamplingParams(temperature=0)
        )
        engine.step()  # the prompt: its first token is tokens[0], as in the reference
        seq = request.seqs[0]
        assert seq.output_token_ids == tokens[:1]
        seq.spec_token_ids = tokens[1:4]  # right drafts: rows at tokens[0..3] predict tokens[1..4]
        engine.block_manager.allocate(seq, seq.num_tokens + 3)
        batch = ScheduledBatch(decodes=[seq])
        if with_prefill:
            other = engine.add_request("other", {"prompt_token_ids": prompt[:9]}, SamplingParams()).seqs[0]
            engine.scheduler.waiting.remove(other)
            engine.block_manager.allocate(other, 9)
            batch.prefills.append((other, 9))
        result = engine.runner.run(batch)
        got = torch.log_softmax(result.logits[:4], dim=-1)
        want = torch.log_softmax(torch.stack(reference[1:5]), dim=-1)
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
        seq.spec_token_ids = []
        engine.abort(request.request_id)
        engine.abort("other")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


# --- a random-weight model of another family -----------------------------------------------------------


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> tuple[LLM, LLM]:
    pytest.importorskip("transformers")
    import model_factory

    path = str(model_factory.cached_hf_model("qwen2", root=tmp_path_factory.mktemp("spec-models")))
    # one thread: a tiny model's products are too small to split, and spinning threads only contend
    options = dict(model=path, max_model_len=256, max_num_seqs=8, num_threads=1)
    return LLM(**options), LLM(**options, speculative={**NGRAM, "num_speculative_tokens": 3})


def _repeating_prompts(vocab: int) -> list[dict[str, list[int]]]:
    rng = np.random.default_rng(7)
    prompts = []
    for length in (5, 9, 13):
        unit = rng.integers(10, vocab - 10, size=length).tolist()
        prompts.append(unit * 3 + unit[:2])
    prompts.append(rng.integers(10, vocab - 10, size=20).tolist())  # nothing repeats: plain rows
    return [{"prompt_token_ids": p} for p in prompts]


def _staggered(engine: LLMEngine, prompts: list[Any], params: SamplingParams) -> list[list[int]]:
    """The prompts added one per step, so new prefills share steps with drafting sequences."""
    ids, outs = [], {}
    for i, prompt in enumerate(prompts):
        ids.append(engine.add_request(f"staggered-{i}", prompt, params).request_id)
        for out in engine.step():
            outs[out.request_id] = out
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs[out.request_id] = out
    return [outs[i].outputs[0].token_ids for i in ids]


def test_greedy_equals_plain_decoding_on_random_qwen2(qwen2: tuple[LLM, LLM]) -> None:
    plain, spec = qwen2
    prompts = _repeating_prompts(1000)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    # a sequence under a grammar does not draft, beside ones that do
    choice = SamplingParams(temperature=0, max_tokens=32, structured_output={"choice": ["yes", "no"]})
    mixed = [params] * len(prompts) + [choice]
    expected = _tokens(plain.generate([*prompts, prompts[0]], mixed))
    got = spec.generate([*prompts, prompts[0]], mixed)
    assert _tokens(got) == expected
    assert got[-1].outputs[0].text in ("yes", "no")
    expected = expected[:-1]
    stats = spec.stats()
    assert stats.spec_num_draft_tokens > 0 and stats.spec_num_accepted_tokens > 0
    assert _staggered(spec.engine, prompts, params) == expected


def test_seeded_sampling_with_speculation_is_reproducible(qwen2: tuple[LLM, LLM]) -> None:
    spec = qwen2[1]
    prompts = _repeating_prompts(1000)
    params = SamplingParams(temperature=0.8, top_p=0.95, repetition_penalty=1.1, max_tokens=24, seed=5)
    before = spec.stats().spec_num_draft_tokens
    first = _tokens(spec.generate(prompts, params))
    assert _tokens(spec.generate(prompts, params)) == first
    assert spec.stats().spec_num_draft_tokens > before


def test_delta_outputs_carry_every_accepted_token_once(qwen2: tuple[LLM, LLM]) -> None:
    plain, spec = qwen2
    prompt = _repeating_prompts(1000)[1]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, output_kind="delta", logprobs=1)
    engine, accepted = spec.engine, spec.stats().spec_num_accepted_tokens
    engine.add_request("deltas", prompt, params)
    tokens: list[int] = []
    logprobs: list[Any] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.outputs[0].token_ids
            logprobs += out.outputs[0].logprobs
    assert spec.stats().spec_num_accepted_tokens > accepted  # some steps emitted several tokens
    reference = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    assert tokens == plain.generate(prompt, reference)[0].outputs[0].token_ids
    assert [next(iter(lp)) for lp in logprobs] == tokens  # each token's entry leads with the token


def test_tuned_step_costs_from_the_table_timings(qwen2: tuple[LLM, LLM]) -> None:
    linears = list(iter_linears(qwen2[0].engine.model.linears()))
    table = DataflowTable(fingerprint={})
    for i, lin in enumerate(linears):
        # every shape timed at M = 1, 2, 4 (linear in between): 1 + i, 1.2 (1 + i), 2 (1 + i) seconds
        times = {1: 1.0 + i, 2: 1.2 * (1.0 + i), 4: 2.0 * (1.0 + i)}
        table.shapes[lin.shape_key()] = ShapeResult(
            plan=lin.plan, times={lin.candidate_at(1): times}, crossovers=[]
        )
    assert all(lin.candidate_at(m) == lin.candidate_at(1) for lin in linears for m in range(1, 6))
    # by hand: M = 3 lies halfway between 1.2 and 2; past the last timed M the time stays flat
    assert tuned_step_costs(linears, table, 4) == pytest.approx([1.0, 1.2, 1.6, 2.0, 2.0])
    del table.shapes[linears[0].shape_key()]
    assert tuned_step_costs(linears, table, 4) is None  # a shape it never timed: no tuned costs


def test_prometheus_metrics_report_the_drafts(qwen2: tuple[LLM, LLM]) -> None:
    pytest.importorskip("prometheus_client")
    from flashdecode.entrypoints.async_engine import AsyncLLMEngine
    from flashdecode.entrypoints.server.metrics import ServerMetrics

    spec = qwen2[1]
    spec.generate(_repeating_prompts(1000)[:1], SamplingParams(temperature=0, max_tokens=16))
    stats = spec.stats()
    assert stats.spec_num_accepted_tokens > 0
    text = ServerMetrics(AsyncLLMEngine(spec.engine), "m").render().decode()
    values = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("flashdecode:spec_decode")
    }
    assert values == {
        "flashdecode:spec_decode_draft_acceptance_rate": pytest.approx(
            stats.spec_num_accepted_tokens / stats.spec_num_draft_tokens
        ),
        "flashdecode:spec_decode_num_draft_tokens_total": stats.spec_num_draft_tokens,
        "flashdecode:spec_decode_num_accepted_tokens_total": stats.spec_num_accepted_tokens,
    }


# --- the sampled distribution ------------------------------------------------------------------------


def _chi_square_p(observed: list[int], expected: list[float]) -> float:
    from scipy.stats import chisquare

    expected_arr = np.asarray(expected, dtype=np.float64)
    assert abs(expected_arr.sum() - sum(observed)) < 1e-3 * sum(observed)
    # rounding of the probabilities aside, both sum to the sample count (scipy checks it to 1e-8)
    return float(chisquare(observed, expected_arr * sum(observed) / expected_arr.sum()).pvalue)


def test_draft_rows_sample_the_target_distribution() -> None:
    """The rejection rule alone: rows verifying a draft x emit tokens distributed as p (after
    temperature and top-k), whether x is likely, unlikely or outside top-k."""
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -1.0, -3.0])
    params = SamplingParams(temperature=0.9, top_k=4)
    p = torch.softmax(logits / 0.9, dim=-1)
    p[4:] = 0
    p /= p.sum()
    n = 4000
    sampler = Sampler()
    for draft in (0, 2, 5):
        gen = torch.Generator().manual_seed(draft)
        rows = [SamplingRow(params, gen, [1], [], draft_token_id=draft) for _ in range(n)]
        tokens = sampler(logits.expand(n, -1).contiguous(), rows).token_ids
        counts = Counter(tokens)
        assert set(counts) <= {0, 1, 2, 3}
        observed = [counts[t] for t in range(4)]
        assert _chi_square_p(observed, (p[:4] * n).tolist()) > 1e-3, (draft, observed)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    pytest.importorskip("transformers")
    import model_factory
    from transformers import AutoModelForCausalLM

    path = model_factory.cached_hf_model("llama", root=tmp_path_factory.mktemp("spec-llama"))
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _top_k_probs(model: Any, ids: list[int], temperature: float, k: int) -> dict[int, float]:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    vals, idx = (logits / temperature).topk(k)
    return dict(zip(idx.tolist(), torch.softmax(vals, dim=-1).tolist()))


def test_sampled_pairs_follow_the_target_model(llama: tuple[Path, Any]) -> None:
    """Chi-square of (first, second) generated tokens against transformers' probabilities. The second
    token comes from a verification row (a draft exists for every likely first token), so both the
    accepted and the rejected branch of the rule decide it."""
    path, reference = llama
    # the model's own greedy continuation falls into a cycle: prompt lookup drafts what it predicts
    with torch.no_grad():
        prompt = reference.generate(
            torch.tensor([[1, 200, 201, 202, 203]]), max_new_tokens=60, do_sample=False
        )
    prompt = prompt[0].tolist()
    temperature, k, n = 0.5, 2, 600
    first = _top_k_probs(reference, prompt, temperature, k)
    expected = {
        (a, b): pa * pb
        for a, pa in first.items()
        for b, pb in _top_k_probs(reference, prompt + [a], temperature, k).items()
    }
    engine = LLM(
        model=str(path),
        max_model_len=128,
        max_num_seqs=256,
        num_threads=1,
        speculative={**NGRAM, "num_speculative_tokens": 1},
    )
    engine.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1))  # caches the prompt's blocks
    # max_tokens=3: the second token's step may draft one token (and the third would be its bonus)
    params = SamplingParams(n=n, temperature=temperature, top_k=k, max_tokens=3, ignore_eos=True, seed=11)
    out = engine.generate({"prompt_token_ids": prompt}, params)[0]
    pairs = Counter(tuple(c.token_ids[:2]) for c in out.outputs)
    assert set(pairs) <= set(expected)
    cells = sorted(expected)
    assert min(expected[c] * n for c in cells) >= 5  # the chi-square approximation holds
    stats = engine.stats()
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens  # both branches ran
    assert _chi_square_p([pairs[c] for c in cells], [expected[c] * n for c in cells]) > 1e-3


# --- the block pool under random traffic ------------------------------------------------------------


def _check_pool(engine: LLMEngine) -> None:
    bm = engine.block_manager
    held: Counter[int] = Counter()
    for seq in [*engine.scheduler.running, *engine.scheduler.waiting]:
        assert not seq.spec_token_ids  # drafts live only inside a step
        assert len(set(seq.block_table)) == len(seq.block_table)
        held.update(seq.block_table)
        # no block held for rejected drafts; every computed token has a block
        assert len(seq.block_table) <= -(-seq.num_tokens // bm.block_size)
        assert len(seq.block_table) * bm.block_size >= seq.num_computed_tokens
        # a published hash covers only tokens the sequence holds and has computed
        assert len(seq.block_hashes) * bm.block_size <= seq.num_computed_tokens
        prev = None
        for i, h in enumerate(seq.block_hashes):
            prev = chain_hash(prev, tuple(seq.token_ids[i * bm.block_size : (i + 1) * bm.block_size]))
            assert h == prev
    for block in bm.blocks:
        assert block.ref_count == held[block.block_id]
        assert (block.block_id in bm.free) == (block.ref_count == 0)
    for h, block_id in bm.cached.items():
        assert bm.blocks[block_id].hash == h


@pytest.fixture(scope="module")
def pool_engine(llama: tuple[Path, Any]) -> LLMEngine:
    path, reference = llama
    cfg = reference.config
    per_token = KVCache.bytes_per_token(
        cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, torch.float32, "auto"
    )
    config = EngineConfig(
        model=str(path),
        max_model_len=64,
        kv_block_size=8,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        kv_cache_bytes=20 * 8 * per_token,  # 20 blocks: room for two or three sequences at a time
        speculative=NGRAM,
        num_threads=1,
    )
    return LLMEngine(config)


_POOL_IDS = itertools.count()
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 3), st.integers(2, 40)),
        st.tuples(st.just("abort"), st.integers(0, 20), st.just(0)),
        st.tuples(st.just("step"), st.integers(1, 6), st.just(0)),
    ),
    min_size=4,
    max_size=14,
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_block_pool_invariants_under_random_add_and_abort(pool_engine: LLMEngine, ops: list[tuple]) -> None:
    run_pool_traffic(pool_engine, ops)


def run_pool_traffic(engine: LLMEngine, ops: list[tuple]) -> None:
    """Adds (greedy and seeded sampled), aborts and steps as ``ops`` say, checking the block pool's
    invariants after each; at the end every block is free again."""
    prompts = [p["prompt_token_ids"] for p in _repeating_prompts(512)]
    live: list[str] = []
    for kind, a, b in ops:
        if kind == "add":
            request_id = f"pool-{next(_POOL_IDS)}"
            params = SamplingParams(temperature=0.7 if a % 2 else 0, max_tokens=b, ignore_eos=True, seed=a)
            engine.add_request(request_id, {"prompt_token_ids": prompts[a][:20]}, params)
            live.append(request_id)
        elif kind == "abort" and live:
            engine.abort(live.pop(a % len(live)))
        else:
            for _ in range(a):
                engine.step()
                _check_pool(engine)
        _check_pool(engine)
    for request_id in live:
        engine.abort(request_id)
    _check_pool(engine)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_the_random_traffic_drafts_and_preempts(pool_engine: LLMEngine) -> None:
    """The pool test's engine does speculate and run out of blocks (else its invariants prove little)."""
    engine = pool_engine
    prompts = [p["prompt_token_ids"] for p in _repeating_prompts(512)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    before = engine.stats()
    for i in range(4):
        engine.add_request(f"busy-{i}", {"prompt_token_ids": prompts[i % 3][:20]}, params)
    while engine.has_unfinished_requests():
        engine.step()
        _check_pool(engine)
    after = engine.stats()
    assert after.spec_num_accepted_tokens > before.spec_num_accepted_tokens
    assert after.num_preemptions > before.num_preemptions


def test_bench_takes_the_speculative_option(llama: tuple[Path, Any]) -> None:
    from flashdecode.tools import bench
    from flashdecode.tools.roofline import Ceilings

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--speculative", '{"method": "ngram", "num_speculative_tokens": 2}'])
    config = bench.BenchConfig(
        model=str(llama[0]),
        batches=[1],
        prompt_lens=[8],
        gen_len=6,
        num_threads=1,
        engine_options={"speculative": args.speculative},
    )
    ceilings = Ceilings(bandwidth=30e9, flops={"fp32": 2e11, "bf16": 7e11, "int8": 1.4e12}, threads=1)
    result = bench.run_bench(config, progress=False, ceilings=ceilings)
    summary = result["engine"]["speculative"]
    assert summary["method"] == "ngram" and summary["num_speculative_tokens"] == 2
    assert summary["num_accepted_tokens"] <= summary["num_draft_tokens"]
    assert result["cells"][0]["runs"][0]["decode_tokens"] == 5  # all but the prefill's token, exactly
