"""End-to-end engine behaviour on the embedded SmolLM2-135M (a real Q4_1 GGUF)."""

from __future__ import annotations

import pytest
import torch

from flashdecode import LLM, SamplingParams
from flashdecode.models.loader import embedded_model_path

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea, the wind, the rain and the long grey winter nights by the shore:",
    "1, 2, 3, 4,",
    "Question: what do bees make? Answer:",
    "def fibonacci(n):",
    "Once upon a time, in a kingdom far away, there lived a princess who loved to read books about",
    "Les fleurs du jardin",
    "The three primary colours are",
]
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_model_len=512, kv_block_size=16, numerics="exact")  # the stored weights' arithmetic


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def batched(llm: LLM) -> list[list[int]]:
    """PROMPTS' greedy tokens as one batch on the module's engine: what running them alone, chunked
    prefill and preemption must leave unchanged (computed once for the three)."""
    return tokens(llm.generate(PROMPTS, GREEDY))


def test_chat_answer_names_paris(llm: LLM) -> None:  # exact numerics (docs/numerics.md)
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=32),
    )
    assert "Paris" in out[0].outputs[0].text
    assert out[0].outputs[0].finish_reason == "stop"  # the model ends its turn with <|im_end|>


def test_logits_match_transformers_on_the_same_gguf(llm: LLM) -> None:
    from transformers import AutoModelForCausalLM

    path = embedded_model_path()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ids = llm.get_tokenizer().encode(PROMPTS[5])
    out = llm.generate(
        {"prompt_token_ids": ids},
        SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=5, logprobs=5, ignore_eos=True),
    )[0]
    generated = out.outputs[0].token_ids
    with torch.no_grad():
        ref = hf(torch.tensor([ids + generated])).logits[0].float().log_softmax(-1)
    # prompt positions: entry t scores token t from the logits at t - 1
    for t, entry in enumerate(out.prompt_logprobs[1:], start=1):
        top5 = ref[t - 1].topk(5)
        assert set(top5.indices.tolist()) <= set(entry), f"top-5 differ at prompt position {t}"
        for tid, lp in entry.items():
            assert abs(lp.logprob - ref[t - 1, tid].item()) < 1e-3
    # generated positions
    for i, entry in enumerate(out.outputs[0].logprobs):
        row = ref[len(ids) - 1 + i]
        assert generated[i] == int(row.argmax())
        for tid, lp in entry.items():
            assert abs(lp.logprob - row[tid].item()) < 1e-3


def test_batching_changes_nothing(llm: LLM, batched: list[list[int]]) -> None:
    together = batched
    alone = [tokens(llm.generate(p, GREEDY))[0] for p in PROMPTS]
    assert together == alone
    # prompts longer than a block and generations crossing block boundaries are covered
    lengths = [len(llm.get_tokenizer().encode(p)) for p in PROMPTS]
    assert max(lengths) > 16 and any(n % 16 > 16 - 40 % 16 for n in lengths)


def test_chunked_prefill_and_prefix_cache_change_nothing(batched: list[list[int]]) -> None:
    reference = batched
    chunked = LLM(
        max_model_len=512,
        kv_block_size=16,
        max_num_batched_tokens=7,
        enable_prefix_caching=False,
        numerics="exact",
    )
    assert tokens(chunked.generate(PROMPTS, GREEDY)) == reference


def test_preemption_under_a_tiny_kv_budget_changes_nothing(llm: LLM, batched: list[list[int]]) -> None:
    reference = batched
    spec = llm.engine.spec
    bytes_per_token = 2 * spec.num_layers * spec.kv_size * 4
    small = LLM(max_model_len=128, kv_block_size=16, kv_cache_bytes=128 * bytes_per_token, numerics="exact")
    assert tokens(small.generate(PROMPTS, GREEDY)) == reference
    assert small.engine.stats().num_preemptions > 0
    assert small.engine.stats().kv_blocks_free == small.engine.stats().kv_blocks_total


def test_prefix_cache_reuses_blocks(llm: LLM) -> None:
    prefix = " ".join(["The quick brown fox jumps over the lazy dog."] * 10)
    first = llm.generate(prefix + " First", GREEDY)[0]
    before = llm.engine.stats().prefix_cache_hits
    second = llm.generate(prefix + " Second", GREEDY)[0]
    assert second.num_cached_tokens >= 16 * ((len(first.prompt_token_ids) - 8) // 16)
    assert llm.engine.stats().prefix_cache_hits > before
    again = llm.generate(prefix + " First", GREEDY)[0]
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_seeded_sampling_is_reproducible_and_n_gives_distinct_samples(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=1234, n=3, ignore_eos=True)
    a = llm.generate(PROMPTS[1], params)[0]
    b = llm.generate([PROMPTS[0], PROMPTS[1]], params)[1]  # other requests in the batch change nothing
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len(a.outputs) == 3 and len({tuple(c.token_ids) for c in a.outputs}) > 1


def test_stop_strings_max_tokens_and_logprobs(llm: LLM) -> None:
    base = llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 12
    assert base.text.startswith(" 5, 6")
    stopped = llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=12, stop=[", 7"]))[
        0
    ].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == ", 7"
    assert stopped.text == base.text[: base.text.index(", 7")]
    lp = llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=3, logprobs=2))[0].outputs[0]
    assert len(lp.logprobs) == 3
    for token, entry in zip(lp.token_ids, lp.logprobs):
        assert token in entry and entry[token].rank == 1 and 2 <= len(entry) <= 3


def test_token_id_prompts_and_context_limit(llm: LLM) -> None:
    ids = llm.get_tokenizer().encode(PROMPTS[0])
    by_text = llm.generate(PROMPTS[0], GREEDY)[0]
    by_ids = llm.generate({"prompt_token_ids": ids}, GREEDY)[0]
    assert by_ids.outputs[0].token_ids == by_text.outputs[0].token_ids and by_ids.prompt_token_ids == ids
    near_limit = llm.generate(
        {"prompt_token_ids": ids * (500 // len(ids))},
        SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
    )[0]
    assert near_limit.outputs[0].finish_reason == "length"
    assert len(near_limit.prompt_token_ids) + len(near_limit.outputs[0].token_ids) == 512


def test_abort_returns_every_block(llm: LLM) -> None:
    engine = llm.engine
    free = engine.stats().kv_blocks_free
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"abort-{i}", prompt, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.stats().kv_blocks_free < free
    for i in range(len(PROMPTS)):
        engine.abort(f"abort-{i}")
    assert engine.stats().kv_blocks_free == free
    assert not engine.has_unfinished_requests()
