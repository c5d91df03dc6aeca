"""Speculative decoding with a draft model (engine/spec_decode.py's DraftModelProposer): the same greedy
tokens as plain decoding, the target's distribution when sampling with a draft whose distribution
differs, and a block pool shared by both models' caches that never leaks a rejected draft.

Plain decoding is the reference for greedy output; transformers for the sampled distribution; a model
drafting for itself must have nearly every draft accepted, which holds only if the draft's KV cache
holds exactly what the target's does (prefix-cache hits and recomputes after preemption included)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from test_speculative import (
    _OPS,
    REPETITIVE,
    _check_pool,
    _chi_square_p,
    _repeating_prompts,
    _staggered,
    _tokens,
    _top_k_probs,
    run_pool_traffic,
)

from flashdecode import LLM, SamplingParams
from flashdecode.config import EngineConfig, SpeculativeConfig
from flashdecode.engine.llm_engine import LLMEngine
from flashdecode.engine.sampler import Sampler, SamplingRow
from flashdecode.engine.spec_decode import draft_step_costs
from flashdecode.entrypoints.cli import speculative_json
from flashdecode.errors import FlashDecodeError
from flashdecode.layers.kv_cache import KVCache
from flashdecode.models.loader import embedded_model_path

K = 3


def _draft(path: Path | str, k: int = K) -> dict[str, Any]:
    return {"method": "draft", "model": str(path), "num_speculative_tokens": k}


def _always_draft(engine: LLMEngine) -> None:
    """Rows cost nothing to the adaptive length: every step of every sequence drafts all it may, so
    the tests exercise the drafts (tiny models' drafts cost nearly what their targets do)."""
    proposer = engine.scheduler.proposer
    proposer.meter, proposer.prior_ratio = None, 0.0
    proposer.prior_costs = [1.0] * len(proposer.prior_costs)


def _acceptance(engine: LLMEngine, before: Any) -> float:
    after = engine.stats()
    drafted = after.spec_num_draft_tokens - before.spec_num_draft_tokens
    assert drafted > 0
    return (after.spec_num_accepted_tokens - before.spec_num_accepted_tokens) / drafted


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random-weight Qwen2s with one tokenizer: the target (2 layers), its first layer alone (the same
    seed: the same embedding and first layer), and one of another seed (a draft that disagrees)."""
    pytest.importorskip("transformers")
    import model_factory

    root = tmp_path_factory.mktemp("draft-models")
    return {
        "target": model_factory.cached_hf_model("qwen2", root=root),
        "layer": model_factory.cached_hf_model("qwen2", root=root, num_hidden_layers=1),
        "other": model_factory.cached_hf_model("qwen2", root=root, seed=5, num_hidden_layers=1),
    }


OPTIONS = dict(max_model_len=256, max_num_seqs=8, num_threads=1)


@pytest.fixture(scope="module")
def qwen2(models: dict[str, Path]) -> tuple[LLM, LLM]:
    options = dict(model=str(models["target"]), **OPTIONS)
    spec = LLM(**options, speculative=_draft(models["layer"]))
    _always_draft(spec.engine)
    return LLM(**options), spec


# --- configuration --------------------------------------------------------------------------------


def test_draft_config_needs_a_model_and_takes_the_cli_json() -> None:
    with pytest.raises(FlashDecodeError, match="needs the draft model's path"):
        SpeculativeConfig.of({"method": "draft"})
    with pytest.raises(FlashDecodeError, match="for method 'draft'"):
        SpeculativeConfig.of({"method": "ngram", "model": "x.gguf"})
    cfg = SpeculativeConfig.of(
        speculative_json('{"method": "draft", "model": "d.gguf", "num_speculative_tokens": 2}')
    )
    assert (cfg.method, cfg.model, cfg.num_speculative_tokens) == ("draft", "d.gguf", 2)


def test_a_draft_with_another_vocabulary_is_refused(models: dict[str, Path]) -> None:
    import model_factory

    other = model_factory.cached_hf_model("qwen2", vocab_size=900, num_hidden_layers=1)
    with pytest.raises(FlashDecodeError, match="vocabulary .* differs"):
        LLM(model=str(models["target"]), **OPTIONS, speculative=_draft(other))


def test_the_budget_holds_both_caches(models: dict[str, Path]) -> None:
    """One block holds a token's K/V of both models: the budget divides by their sum (by hand)."""
    target = KVCache.bytes_per_token(2, 2, 16, torch.float32, "auto")  # qwen2: 96 / 6 heads = 16
    draft = KVCache.bytes_per_token(1, 2, 16, torch.float32, "auto")
    config = EngineConfig(
        model=str(models["target"]),
        **OPTIONS,
        kv_block_size=8,
        kv_cache_bytes=40 * 8 * (target + draft) + 8 * target,  # 40 blocks, and not quite 41
        speculative=_draft(models["layer"]),
    )
    assert LLMEngine(config).block_manager.num_blocks == 40


def test_draft_step_costs_by_hand() -> None:
    # d drafts: the target's d + 1 rows plus d + 1 draft rows, over one target row and one draft row
    assert draft_step_costs([1.0, 1.5, 2.0], 0.25) == pytest.approx([1.0, 2.0 / 1.25, 2.75 / 1.25])


# --- greedy equality ------------------------------------------------------------------------------


def test_greedy_equals_plain_decoding_with_a_draft_model(qwen2: tuple[LLM, LLM]) -> None:
    plain, spec = qwen2
    prompts = _repeating_prompts(1000)
    before = spec.stats()
    # beside drafting sequences: one under a grammar (never drafts), one near its max_tokens (fewer
    # drafts than the others in its last steps), one with logprobs
    params = [SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)] * len(prompts) + [
        SamplingParams(temperature=0, max_tokens=32, structured_output={"choice": ["yes", "no"]}),
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2),
    ]
    batch = [*prompts, *prompts[:3]]
    expected, got = plain.generate(batch, params), spec.generate(batch, params)
    assert _tokens(got) == _tokens(expected)
    assert got[len(prompts)].outputs[0].text in ("yes", "no")
    for e, g in zip(expected[-1].outputs[0].logprobs, got[-1].outputs[0].logprobs):
        assert e.keys() == g.keys()
    assert 0 < _acceptance(spec.engine, before) < 1  # drafts accepted and rejected
    assert _staggered(spec.engine, prompts, params[0]) == _tokens(expected)[: len(prompts)]
    stats = spec.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_the_embedded_model_drafting_for_itself() -> None:
    """Greedy output is plain decoding's, and the draft, the target itself, is accepted almost
    always: also on a second request whose prompt comes from the prefix cache."""
    spec = LLM(
        max_model_len=128, numerics="exact", max_num_seqs=2, speculative=_draft(embedded_model_path(), 4)
    )
    assert spec.engine.scheduler.proposer.runner.model is spec.engine.model  # one copy of the weights
    _always_draft(spec.engine)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompt = REPETITIVE[0]
    got = []
    for _ in range(2):
        before = spec.stats()
        got.append(_tokens(spec.generate(prompt, params)))
        assert _acceptance(spec.engine, before) > 0.9
    assert spec.stats().prefix_cache_hits > 0
    # the reference: the same engine decoding plainly (no proposer; test_speculative.py holds that to
    # the engine without speculation), last, since without the proposer the draft's cache lags
    spec.engine.scheduler.proposer = None
    assert got == [_tokens(spec.generate(prompt, params))] * 2


# --- sampling -------------------------------------------------------------------------------------


def test_seeded_sampling_with_a_draft_model_is_reproducible(qwen2: tuple[LLM, LLM]) -> None:
    spec = qwen2[1]
    prompts = _repeating_prompts(1000)[1:]
    params = SamplingParams(temperature=0.8, top_p=0.95, repetition_penalty=1.1, max_tokens=16, seed=5)
    before = spec.stats()
    first = _tokens(spec.generate(prompts, params))
    assert _tokens(spec.generate(prompts, params)) == first
    assert 0 < _acceptance(spec.engine, before) < 1


def test_rows_verifying_a_sampled_draft_emit_the_target_distribution() -> None:
    """The rejection rule with a real q: drafts drawn from q (Sampler.draft, under the same
    parameters), verified against p, emit tokens distributed as p (temperature and top-k applied)."""
    p_logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -1.0, -3.0])
    q_logits = torch.tensor([-1.0, 1.0, 2.5, 0.0, 1.8, -2.0])  # q favours 2 and 4, which p ranks low
    params = SamplingParams(temperature=0.9, top_k=4)
    p = torch.softmax(p_logits / 0.9, dim=-1)
    p[4:] = 0
    p /= p.sum()
    n = 4000
    gen = torch.Generator().manual_seed(3)
    rows = [SamplingRow(params, gen, [1], []) for _ in range(n)]
    sampler = Sampler()
    drafts, qs = sampler.draft(q_logits.expand(n, -1).contiguous(), rows)
    assert Counter(drafts).keys() <= {1, 2, 3, 4}  # q's own top 4
    rows = [SamplingRow(params, gen, [1], [], draft_token_id=x, draft_probs=q) for x, q in zip(drafts, qs)]
    tokens = sampler(p_logits.expand(n, -1).contiguous(), rows).token_ids
    counts = Counter(tokens)
    assert set(counts) <= {0, 1, 2, 3}
    assert 0 < sum(t == x for t, x in zip(tokens, drafts)) < n  # both branches of the rule ran
    assert _chi_square_p([counts[t] for t in range(4)], (p[:4] * n).tolist()) > 1e-3


def test_sampled_pairs_follow_the_target_with_a_different_draft(models: dict[str, Path]) -> None:
    """Chi-square of (first, second) generated tokens against transformers' target probabilities,
    drafted by a model of another seed: the second token comes from a verification row."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(models["target"], dtype=torch.float32).eval()
    prompt = [5, 200, 201, 202, 203, 17]
    temperature, k, n = 0.8, 2, 600
    first = _top_k_probs(reference, prompt, temperature, k)
    expected = {
        (a, b): pa * pb
        for a, pa in first.items()
        for b, pb in _top_k_probs(reference, prompt + [a], temperature, k).items()
    }
    engine = LLM(
        model=str(models["target"]),
        max_model_len=64,
        max_num_seqs=1024,
        num_threads=1,
        speculative=_draft(models["other"], 1),
    )
    _always_draft(engine.engine)
    params = SamplingParams(n=n, temperature=temperature, top_k=k, max_tokens=3, ignore_eos=True, seed=11)
    out = engine.generate({"prompt_token_ids": prompt}, params)[0]
    pairs = Counter(tuple(c.token_ids[:2]) for c in out.outputs)
    assert set(pairs) <= set(expected)
    cells = sorted(expected)
    assert min(expected[c] * n for c in cells) >= 5  # the chi-square approximation holds
    stats = engine.stats()
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens  # both branches ran
    assert _chi_square_p([pairs[c] for c in cells], [expected[c] * n for c in cells]) > 1e-3


# --- the shared block pool --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool_engine(models: dict[str, Path]) -> LLMEngine:
    """The target drafting for itself in a pool of 20 blocks (two or three sequences at a time)."""
    per_token = 2 * KVCache.bytes_per_token(2, 2, 16, torch.float32, "auto")
    config = EngineConfig(
        model=str(models["target"]),
        max_model_len=64,
        kv_block_size=8,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        kv_cache_bytes=20 * 8 * per_token,
        speculative=_draft(models["target"]),
        num_threads=1,
    )
    engine = LLMEngine(config)
    _always_draft(engine)
    return engine


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_block_pool_invariants_under_random_add_and_abort(pool_engine: LLMEngine, ops: list[tuple]) -> None:
    run_pool_traffic(pool_engine, ops)


def test_preempted_sequences_draft_as_well_after_their_recompute(pool_engine: LLMEngine) -> None:
    """The pool runs out of blocks and preempts, and the self-draft is still accepted almost always:
    the recompute refilled the draft's cache too."""
    engine = pool_engine
    prompts = [p["prompt_token_ids"] for p in _repeating_prompts(512)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    before = engine.stats()
    for i in range(4):
        engine.add_request(f"busy-{i}", {"prompt_token_ids": prompts[i % 3][:20]}, params)
    while engine.has_unfinished_requests():
        engine.step()
        _check_pool(engine)
    assert engine.stats().num_preemptions > before.num_preemptions
    assert _acceptance(engine, before) > 0.9
