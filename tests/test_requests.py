"""Per-request semantics through the real engine on the embedded SmolLM2-135M: min_tokens, stop token
ids and stop strings (finish and stop reasons, include_stop_str_in_output), and the three output
kinds as LLMEngine.step() delivers them."""

from __future__ import annotations

import pytest

from flashdecode import LLM, SamplingParams

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
COUNTING = "1, 2, 3, 4,"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_model_len=256, kv_block_size=16, numerics="exact")


def greedy(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, **kwargs)


def completion(llm: LLM, prompt, params: SamplingParams):
    if isinstance(prompt, list):
        return llm.chat(prompt, params)[0].outputs[0]
    return llm.generate(prompt, params)[0].outputs[0]


def test_stop_token_ids_end_generation_with_their_id(llm: LLM) -> None:
    base = completion(llm, COUNTING, greedy(max_tokens=8))
    assert base.finish_reason == "length" and len(base.token_ids) == 8
    stop_id = base.token_ids[2]
    assert stop_id not in base.token_ids[:2]  # it first occurs at step 2
    out = completion(llm, COUNTING, greedy(max_tokens=8, stop_token_ids=[stop_id]))
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == base.token_ids[:3]  # the stop token is the last token, as in vLLM
    assert out.text == llm.get_tokenizer().decode(base.token_ids[:2])  # but not part of the text


def test_min_tokens_suppresses_stop_token_ids_until_reached(llm: LLM) -> None:
    base = completion(llm, COUNTING, greedy(max_tokens=6, logprobs=2, ignore_eos=True))
    first = base.token_ids[0]
    runner_up = next(t for t, lp in base.logprobs[0].items() if lp.rank == 2)
    # without min_tokens greedy's own first token ends the request at once
    stopped = completion(llm, COUNTING, greedy(max_tokens=6, stop_token_ids=[first], ignore_eos=True))
    assert stopped.token_ids == [first] and stopped.stop_reason == first
    out = completion(
        llm, COUNTING, greedy(max_tokens=6, min_tokens=4, stop_token_ids=[first], ignore_eos=True)
    )
    assert len(out.token_ids) >= 4
    assert first not in out.token_ids[:4]
    assert out.token_ids[0] == runner_up  # suppressed: greedy takes the next most likely token


def test_min_tokens_suppresses_eos_until_reached(llm: LLM) -> None:
    base = completion(llm, CHAT, greedy(max_tokens=32))
    assert base.finish_reason == "stop" and base.stop_reason is None  # the model's end of turn
    eos = base.token_ids[-1]
    n = len(base.token_ids)
    assert eos not in base.token_ids[:-1] and n < 20
    out = completion(llm, CHAT, greedy(max_tokens=n + 8, min_tokens=n + 4))
    assert len(out.token_ids) >= n + 4
    assert eos not in out.token_ids[: n + 4]
    assert out.token_ids[: n - 1] == base.token_ids[:-1]  # nothing else changed before the EOS


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_and_include_stop_str_in_output(llm: LLM, include: bool) -> None:
    base = completion(llm, COUNTING, greedy(max_tokens=12))
    assert base.text.startswith(" 5, 6, 7, 8")
    stop = ", 7"
    out = completion(llm, COUNTING, greedy(max_tokens=12, stop=[stop], include_stop_str_in_output=include))
    assert out.finish_reason == "stop" and out.stop_reason == stop
    cut = base.text.index(stop)
    assert out.text == (base.text[: cut + len(stop)] if include else base.text[:cut])
    assert out.text == (" 5, 6, 7" if include else " 5, 6")  # by hand, from the text above


def run_steps(llm: LLM, requests: dict[str, SamplingParams], prompt: str) -> dict[str, list]:
    """Add the requests to the engine together and step until all finish; every output per request."""
    engine = llm.engine
    for request_id, params in requests.items():
        engine.add_request(request_id, prompt, params)
    outputs: dict[str, list] = {request_id: [] for request_id in requests}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id].append(out)
        steps += 1
        assert steps < 200
    return outputs


def test_output_kinds_through_engine_steps(llm: LLM) -> None:
    prompt = "The three primary colours are"
    kinds = ("cumulative", "delta", "final_only")
    requests = {f"kind-{k}": greedy(max_tokens=12, ignore_eos=True, output_kind=k) for k in kinds}
    outputs = run_steps(llm, requests, prompt)

    cumulative = outputs["kind-cumulative"]
    assert len(cumulative) == 12  # one output per step that advanced the request: one token each
    final = cumulative[-1].outputs[0]
    assert cumulative[-1].finished and not any(o.finished for o in cumulative[:-1])
    assert len(final.token_ids) == 12 and final.finish_reason == "length"
    for a, b in zip(cumulative, cumulative[1:]):
        assert b.outputs[0].text.startswith(a.outputs[0].text)

    # final_only: nothing while it runs, then exactly one output, the whole completion
    (only,) = outputs["kind-final_only"]
    assert only.finished
    assert only.outputs[0].token_ids == final.token_ids and only.outputs[0].text == final.text
    assert only.outputs[0].finish_reason == "length"

    # delta: as many outputs as cumulative, each only what is new; together, the whole completion
    delta = outputs["kind-delta"]
    assert len(delta) == len(cumulative) and delta[-1].finished
    assert all(len(o.outputs[0].token_ids) == 1 for o in delta)
    assert "".join(o.outputs[0].text for o in delta) == final.text
    assert [t for o in delta for t in o.outputs[0].token_ids] == final.token_ids
    assert llm.engine.stats().kv_blocks_free == llm.engine.stats().kv_blocks_total
