"""Serving-grade engine behaviour: preemption, prefix caching, abort, chunked prefill, priorities,
int8 KV cache, streaming."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from importlib.resources import files

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashdecode import LLM, SamplingParams
from flashdecode.engine.detokenizer import append_new_text
from flashdecode.engine.llm_engine import LLMEngine
from flashdecode.engine.sequence import Request, Sequence
from flashdecode.entrypoints.async_engine import AsyncLLMEngine

HELDOUT = files("flashdecode").joinpath("data/heldout.txt").read_text()
TOPICS = ["the sea", "a cat", "Paris", "numbers", "music", "trees", "the moon", "bread"]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_model_len=4608, kv_block_size=16)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def kv_bytes_per_token(llm: LLM) -> int:
    spec = llm.engine.spec
    return 2 * spec.num_layers * spec.kv_size * llm.engine.dtype.itemsize


def test_32_concurrent_requests_survive_preemption_unchanged(hf_model) -> None:
    path = str(hf_model("llama"))
    prompts = [{"prompt_token_ids": [(13 * i + j) % 500 + 1 for j in range(5 + i % 11)]} for i in range(32)]
    ample = LLM(model=path, max_model_len=64, num_threads=1)
    expected = [o.outputs[0].token_ids for o in ample.generate(prompts, greedy(24))]
    tight = LLM(
        model=path,
        max_model_len=64,
        kv_block_size=16,
        num_threads=1,
        kv_cache_bytes=6 * 16 * kv_bytes_per_token(ample),
    )
    assert tight.engine.block_manager.num_blocks == 6  # room for about three of the 32 at a time
    outs = tight.generate(prompts, greedy(24))
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = tight.engine.stats()
    assert stats.num_preemptions > 0
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_shared_1000_token_prefix_reuses_blocks(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    prefix = tok.encode(HELDOUT * 2)[:1000]
    first = llm.generate({"prompt_token_ids": prefix + tok.encode(" First question?")}, greedy(4))[0]
    hits = llm.engine.stats().prefix_cache_hits
    second = llm.generate({"prompt_token_ids": prefix + tok.encode(" Second question?")}, greedy(4))[0]
    assert second.num_cached_tokens == 16 * (1000 // 16)
    assert llm.engine.stats().prefix_cache_hits - hits == 1000 // 16
    assert first.num_cached_tokens < second.num_cached_tokens


def test_multi_turn_chat_does_not_recompute_its_history(llm: LLM) -> None:
    turn1 = [{"role": "user", "content": "Tell me about the history of Paris in a few sentences."}]
    reply = llm.chat(turn1, greedy(16))[0]
    turn2 = turn1 + [
        {"role": "assistant", "content": reply.outputs[0].text},
        {"role": "user", "content": "And of London?"},
    ]
    second = llm.chat(turn2, greedy(4))[0]
    assert second.num_cached_tokens >= 16 * ((len(reply.prompt_token_ids) + 10) // 16)


def test_chunked_prefill_does_not_stall_running_decodes(llm: LLM) -> None:
    # eight chunks of a prompt beside four decodes: the check needs several chunks, not a long prompt
    engine = llm.engine
    budget, prompt_len = 128, 1000
    engine.scheduler.max_num_batched_tokens = budget
    engine.step_log = []
    try:
        for i in range(4):
            engine.add_request(f"decoder-{i}", f"Count slowly about {TOPICS[i]}:", greedy(40))
        for _ in range(3):
            engine.step()
        # a unique first block, so nothing of it is in the prefix cache from other tests
        long_ids = (llm.get_tokenizer().encode("Chunked prefill check. " + HELDOUT) * 5)[:prompt_len]
        engine.add_request("long", {"prompt_token_ids": long_ids}, greedy(2))
        while engine.has_unfinished_requests():
            engine.step()
        chunk_steps = [r for r in engine.step_log if any(rid == "long" for rid, _ in r.prefills)]
    finally:
        engine.step_log = None
        engine.scheduler.max_num_batched_tokens = llm.engine.config.max_num_batched_tokens
    assert len(chunk_steps) >= prompt_len // budget  # the prompt really was split
    assert sum(n for r in chunk_steps for rid, n in r.prefills if rid == "long") == prompt_len
    # every chunk step also advanced all four decoding sequences
    for record in chunk_steps:
        assert sorted(record.decodes) == [f"decoder-{i}" for i in range(4)]


def test_priorities_run_lower_values_first(llm: LLM) -> None:
    engine = llm.engine
    engine.scheduler.max_num_seqs = 1
    try:
        engine.add_request("low", "A story about a dog:", greedy(6), priority=5)
        engine.add_request("high", "A story about a cat:", greedy(6), priority=-1)
        order = []
        while engine.has_unfinished_requests():
            order += [o.request_id for o in engine.step() if o.finished]
    finally:
        engine.scheduler.max_num_seqs = llm.engine.config.max_num_seqs
    assert order == ["high", "low"]


def test_int8_kv_cache_keeps_greedy_output_and_perplexity() -> None:
    # The 135M model has many near-ties (top-2 logprobs within a few hundredths of a nat) in 32 greedy
    # tokens; int8 rounding (perplexity moves by ~0.1%) may flip those, and only those.
    prompts = [
        "The capital of France is",
        "def add(a, b):",
        "Once upon a time",
        "1, 2, 3,",
        "Water boils at",
        "The three primary colours are",
        "My favourite food is",
        "import numpy as np",
        "The Eiffel Tower is located in",
        "Dear Sir or Madam,",
    ]
    reference = LLM(max_model_len=1024, numerics="exact")
    quantized = LLM(max_model_len=1024, kv_cache_dtype="int8", numerics="exact")
    assert quantized.engine.cache.k.dtype.itemsize * 4 == reference.engine.cache.k.dtype.itemsize
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=2)
    equal = 0
    for a, b in zip(reference.generate(prompts, params), quantized.generate(prompts, params)):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        if ta == tb:
            equal += 1
            continue
        # a divergence is only acceptable at a near-tie of the unquantized model (int8 rounding moves
        # logprobs by a few hundredths of a nat)
        i = next(k for k in range(len(ta)) if ta[k] != tb[k])
        top2 = sorted((lp.logprob for lp in a.outputs[0].logprobs[i].values()), reverse=True)[:2]
        assert len(top2) == 2 and top2[0] - top2[1] < 0.25, (a.prompt, i, top2)
    assert equal >= 5

    def perplexity(model: LLM) -> float:
        ids = model.get_tokenizer().encode(HELDOUT)[:1000]
        out = model.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
        nll = [-entry[t].logprob for t, entry in zip(ids[1:], out.prompt_logprobs[1:])]
        return math.exp(sum(nll) / len(nll))

    base, q = perplexity(reference), perplexity(quantized)
    assert q < base * 1.01, (base, q)


def test_streamed_deltas_concatenate_to_the_final_text(llm: LLM) -> None:
    prompt = "Repeat after me: 你好世界 🌍. Again: 你好世界 🌍. Again:"
    # direct check on the detokenizer: every split of multi-byte characters across tokens
    tok = llm.get_tokenizer()
    text = "Café 日本語のテキスト 👩‍👩‍👧 emoji 🎉🎉 and ñandú — done."
    ids = tok.encode(text, add_special_tokens=False)
    request = Request("r", None, [ids[0]], SamplingParams(max_tokens=len(ids)))
    seq = Sequence(request=request, index=0, token_ids=[ids[0]], generator=None)
    pieces = []
    for t in ids[1:]:
        seq.token_ids.append(t)
        pieces.append(append_new_text(tok, seq))
    assert "".join(pieces) == tok.decode(ids[1:])
    assert all("\ufffd" not in p for p in pieces)

    # through the async engine (a prompt whose greedy continuation repeats CJK and emoji), with a stop
    # string that spans tokens
    async def stream(params: SamplingParams) -> tuple[str, str]:
        engine = AsyncLLMEngine(llm.engine)
        deltas, final = [], None
        async for out in engine.generate(prompt, params):
            deltas.append(out.outputs[0].text)
            final = out
        await engine.shutdown()
        return "".join(deltas), final

    joined, final = asyncio.run(stream(SamplingParams(temperature=0, max_tokens=40, output_kind="delta")))
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40))
    assert joined == full[0].outputs[0].text
    assert any(0x4E00 <= ord(c) <= 0x9FFF for c in joined) and any(ord(c) >= 0x1F300 for c in joined)
    stop = full[0].outputs[0].text[5:9]
    params = SamplingParams(temperature=0, max_tokens=40, output_kind="delta", stop=[stop])
    joined, final = asyncio.run(stream(params))
    assert joined == full[0].outputs[0].text[:5] and final.outputs[0].finish_reason == "stop"


def test_async_abort_frees_blocks_at_once(llm: LLM) -> None:
    async def run() -> tuple[int, int]:
        engine = AsyncLLMEngine(llm.engine)
        free = engine.stats().kv_blocks_free
        stream = engine.generate("Tell me a very long story.", greedy(500), request_id="to-abort")
        async for out in stream:
            if len(out.outputs[0].token_ids) >= 5:
                break
        await stream.aclose()  # a client disconnect
        after = engine.stats().kv_blocks_free
        await engine.shutdown()
        return free, after

    free, after = asyncio.run(run())
    assert after == free


@pytest.fixture(scope="module")
def tiny_engine(hf_model) -> LLMEngine:
    """A random 2-layer Llama with 40 KV blocks of 4 tokens: small enough that 6 concurrent
    sequences must preempt each other."""
    probe = LLM(model=str(hf_model("llama")), max_model_len=64, num_threads=1)
    per_block = 4 * kv_bytes_per_token(probe)
    llm = LLM(
        model=str(hf_model("llama")),
        max_model_len=64,
        kv_block_size=4,
        kv_cache_bytes=40 * per_block,
        num_threads=1,
        max_num_seqs=6,
        max_num_batched_tokens=24,
    )
    return llm.engine


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 20), st.integers(-1, 1)),
        st.tuples(st.just("abort"), st.integers(0, 50)),
        st.tuples(st.just("step"), st.integers(1, 4)),
    ),
    min_size=50,
    max_size=50,
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_blocks_are_never_leaked(tiny_engine: LLMEngine, ops: list) -> None:
    """1,000 random add / abort / step operations (20 runs of 50): every block returns to the pool,
    nothing is double-freed, and every request that was not aborted finishes with its full length."""
    engine = tiny_engine
    total = engine.block_manager.num_blocks
    live: list[str] = []
    aborted: set[str] = set()
    finished: dict[str, int] = {}
    wanted: dict[str, int] = {}
    for i, op in enumerate(ops):
        if op[0] == "add":
            _, prompt_len, max_tokens, prio = op
            rid = f"p{i}"
            prompt = [(7 * i + j) % 500 + 1 for j in range(prompt_len % 8 + 1)] * (prompt_len // 8 + 1)
            engine.add_request(
                rid, {"prompt_token_ids": prompt[:prompt_len]}, greedy(max_tokens), priority=prio
            )
            live.append(rid)
            wanted[rid] = max_tokens
        elif op[0] == "abort" and live:
            rid = live.pop(op[1] % len(live))
            engine.abort(rid)
            aborted.add(rid)
        else:
            for _ in range(op[1]):
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = len(out.outputs[0].token_ids)
                        live.remove(out.request_id)
        used = sum(1 for b in engine.block_manager.blocks if b.ref_count > 0)
        assert used + engine.block_manager.num_free_blocks == total
        assert all(b.ref_count >= 0 for b in engine.block_manager.blocks)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = len(out.outputs[0].token_ids)
    assert engine.block_manager.num_free_blocks == total
    assert all(finished[r] == n for r, n in wanted.items() if r not in aborted)


def test_preemption_keeps_prompt_logprobs_and_seeded_samples(hf_model) -> None:
    """n = 3 seeded samples per request with prompt logprobs, under a KV budget that forces
    preemption (and recomputation mid-prefill: prompts arrive in chunks of at most 24 tokens): every
    token, sample logprob and prompt logprob is what a run with room for everything gives."""
    path = str(hf_model("llama"))
    prompts = [{"prompt_token_ids": [(11 * i + 5 * j) % 500 + 1 for j in range(9 + 3 * i)]} for i in range(8)]
    params = SamplingParams(
        n=3, temperature=1.0, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True, logprobs=1, prompt_logprobs=2
    )
    ample = LLM(model=path, max_model_len=64, kv_block_size=4, num_threads=1)
    expected = ample.generate(prompts, params)
    assert ample.engine.stats().num_preemptions == 0
    tight = LLM(
        model=path,
        max_model_len=64,
        kv_block_size=4,
        num_threads=1,
        kv_cache_bytes=24 * 4 * kv_bytes_per_token(ample),
        max_num_batched_tokens=24,
    )
    assert tight.engine.block_manager.num_blocks == 24  # 96 tokens for 24 sequences of up to 46
    got = tight.generate(prompts, params)
    stats = tight.engine.stats()
    assert stats.num_preemptions > 0
    assert stats.kv_blocks_free == stats.kv_blocks_total

    def same_logprobs(have, want, where: str) -> None:
        """The same token ids and ranks at every position, the same values up to fp32 summation order
        (a decode step's batch differs between the two runs)."""
        assert len(have) == len(want), where
        for i, (h, w) in enumerate(zip(have, want)):
            if w is None:
                assert h is None, (where, i)
                continue
            assert {t: lp.rank for t, lp in h.items()} == {t: lp.rank for t, lp in w.items()}, (where, i)
            assert all(abs(h[t].logprob - w[t].logprob) < 1e-4 for t in w), (where, i)

    for k, (want, have) in enumerate(zip(expected, got)):
        assert len(have.outputs) == 3
        assert have.prompt_logprobs is not None and len(have.prompt_logprobs) == len(want.prompt_token_ids)
        same_logprobs(have.prompt_logprobs, want.prompt_logprobs, f"request {k} prompt")
        for a, b in zip(want.outputs, have.outputs):
            assert b.token_ids == a.token_ids, (k, a.index)
            same_logprobs(b.logprobs, a.logprobs, f"request {k} sample {a.index}")
    # the three samples of a request differ: each sequence kept its own generator through preemption
    assert all(len({tuple(c.token_ids) for c in out.outputs}) == 3 for out in got)


@pytest.fixture(scope="module")
def tiny_llm(hf_model) -> LLM:
    return LLM(model=str(hf_model("llama")), max_model_len=64, kv_block_size=4, num_threads=1)


TINY_PROMPTS = [[(17 * i + 3 * j) % 500 + 1 for j in range(6 + 5 * i)] for i in range(4)]


def test_concurrent_async_streams_match_the_offline_engine(tiny_llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    offline = tiny_llm.generate([{"prompt_token_ids": p} for p in TINY_PROMPTS], params)

    async def run() -> list[tuple[str, list[int], int]]:
        engine = AsyncLLMEngine(tiny_llm.engine)

        async def consume(ids: list[int]) -> tuple[str, list[int], int]:
            final, count = None, 0
            async for out in engine.generate({"prompt_token_ids": ids}, params):
                final, count = out, count + 1
            return final.outputs[0].text, final.outputs[0].token_ids, count

        try:
            return await asyncio.wait_for(asyncio.gather(*(consume(p) for p in TINY_PROMPTS)), timeout=60)
        finally:
            await engine.shutdown()

    streamed = asyncio.run(run())
    for out, (text, token_ids, count) in zip(offline, streamed):
        assert token_ids == out.outputs[0].token_ids and text == out.outputs[0].text
        assert count >= 2  # streamed as it ran, not in one piece
    stats = tiny_llm.engine.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total and not tiny_llm.engine.has_unfinished_requests()


def failing_once(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the engine's next step raise RuntimeError("injected step failure"); later steps run."""
    real, calls = engine.step, []

    def step():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected step failure")
        return real()

    monkeypatch.setattr(engine, "step", step)
    return calls


def test_a_failed_step_reaches_every_waiting_stream(tiny_llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stream in flight gets EngineDeadError (none hangs), their KV blocks return to the pool,
    and the engine stays dead: a request made afterwards fails at once with the same error type,
    even though the next step would run (async_engine.py: ``_ensure_running``)."""
    from flashdecode.entrypoints.async_engine import EngineDeadError

    calls = failing_once(tiny_llm.engine, monkeypatch)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)

    async def run() -> tuple[list[BaseException], BaseException | None]:
        engine = AsyncLLMEngine(tiny_llm.engine)

        async def consume(ids: list[int]) -> None:
            async for _ in engine.generate({"prompt_token_ids": ids}, params):
                pass

        results = await asyncio.wait_for(
            asyncio.gather(*(consume(p) for p in TINY_PROMPTS), return_exceptions=True), timeout=60
        )
        later = None
        try:
            await asyncio.wait_for(consume(TINY_PROMPTS[0]), timeout=10)
        except BaseException as exc:  # noqa: BLE001 - the test inspects whatever came out
            later = exc
        with contextlib.suppress(RuntimeError):  # see test_shutdown_after_a_failed_step_returns
            await engine.shutdown()
        return results, later

    results, later = asyncio.run(run())
    assert len(calls) == 1  # the failing step was the only one
    assert all(isinstance(r, EngineDeadError) and "injected step failure" in str(r) for r in results), results
    assert isinstance(later, EngineDeadError), later
    stats = tiny_llm.engine.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total
    assert not tiny_llm.engine.has_unfinished_requests()


def test_shutdown_after_a_failed_step_returns(tiny_llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step's error already went to every stream; shutting the engine down afterwards (a server
    exiting) must not raise it a second time."""
    from flashdecode.entrypoints.async_engine import EngineDeadError

    failing_once(tiny_llm.engine, monkeypatch)

    async def run() -> str | None:
        engine = AsyncLLMEngine(tiny_llm.engine)
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate(
                {"prompt_token_ids": TINY_PROMPTS[0]}, SamplingParams(max_tokens=4)
            ):
                pass
        try:
            await asyncio.wait_for(engine.shutdown(), timeout=10)
        except Exception as exc:  # noqa: BLE001 - reported below, as text
            return repr(exc)
        return None

    raised = asyncio.run(run())
    # reported without the traceback: pytest cannot render one that ran through the worker thread
    # (CPython 3.11's "AST constructor recursion depth mismatch" aborts the whole session)
    if raised is not None:
        pytest.fail(f"AsyncLLMEngine.shutdown() raised {raised} after a failed step", pytrace=False)


def test_a_grammar_compiles_off_the_event_loop_while_other_streams_go_on(tiny_llm: LLM, monkeypatch) -> None:
    """The matcher of a structured request is built in a thread: here it is held until another
    request has streamed three outputs, which could never happen if it blocked the event loop."""
    structured = tiny_llm.engine.structured_outputs
    build = structured.matcher
    released, threads = threading.Event(), []

    def held_matcher(grammar: str):
        threads.append(threading.get_ident())
        released.wait(timeout=30)
        return build(grammar)

    monkeypatch.setattr(structured, "matcher", held_matcher)
    plain = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, output_kind="delta")
    constrained = SamplingParams(temperature=0, max_tokens=8, structured_output={"choice": ["yes", "no"]})

    async def run() -> tuple[int, str]:
        engine = AsyncLLMEngine(tiny_llm.engine)

        async def stream_plain() -> int:
            seen = 0
            async for _ in engine.generate({"prompt_token_ids": TINY_PROMPTS[0]}, plain):
                seen += 1
                if seen == 3:
                    released.set()
            return seen

        async def constrained_text() -> str:
            async for out in engine.generate({"prompt_token_ids": TINY_PROMPTS[1]}, constrained):
                final = out
            return final.outputs[0].text

        try:
            return await asyncio.wait_for(asyncio.gather(stream_plain(), constrained_text()), timeout=60)
        finally:
            await engine.shutdown()

    loop_thread = threading.get_ident()
    seen, text = asyncio.run(run())
    assert released.is_set() and seen >= 3
    assert threads and all(t != loop_thread for t in threads)
    assert text in ("yes", "no")


def test_the_server_compiles_schemas_off_the_event_loop(tiny_llm: LLM, monkeypatch) -> None:
    """A response_format schema and a tool's parameters compile in a thread, not in the handler's
    event loop (the engine-side matcher is covered above)."""
    from flashdecode import sampling_params
    from flashdecode.entrypoints.server import tool_calls
    from flashdecode.entrypoints.server.errors import APIError
    from flashdecode.entrypoints.server.handlers import OpenAIServing, ServerSettings
    from flashdecode.entrypoints.server.metrics import ServerMetrics
    from flashdecode.entrypoints.server.protocol import ChatCompletionRequest

    threads: list[tuple[str, int]] = []
    for module, name in ((sampling_params, "_compile_grammar"), (tool_calls, "_check_schema")):
        original = getattr(module, name)

        def recorded(*args, _original=original, _name=name):
            threads.append((_name, threading.get_ident()))
            return _original(*args)

        monkeypatch.setattr(module, name, recorded)
    engine = AsyncLLMEngine(tiny_llm.engine)
    serving = OpenAIServing(engine, ServerSettings(model_names=["tiny"]), ServerMetrics(engine, "tiny"))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    hi = [{"role": "user", "content": "Hi"}]
    req = ChatCompletionRequest(
        messages=hi,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    # top_logprobs without logprobs: refused after the tools are planned, before anything generates
    with_tools = ChatCompletionRequest(messages=hi, tools=[tool], top_logprobs=2)

    async def run() -> None:
        await serving._sampling(req, 8, None, None)
        with pytest.raises(APIError, match="top_logprobs requires logprobs"):
            await serving.create_chat_completion(with_tools, None)

    asyncio.run(run())  # the event loop runs in this thread
    assert sorted({name for name, _ in threads}) == ["_check_schema", "_compile_grammar"]
    assert all(t != threading.get_ident() for _, t in threads)
