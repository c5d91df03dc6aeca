"""Gemma 2 and Gemma 3 in the native model step (kernels/cpu/decode_step.c) against the Python layers it
replaces: same greedy tokens and prompt and output log-probabilities to fp32 rounding. Gemma's
features are each on: post-norms, GeGLU, the attention scale, soft-capped scores (Gemma 2), sliding
layers of 8 keys beside global ones, Gemma 3's q/k norms and its sliding layers' own RoPE base beside
linearly scaled global RoPE. Prompts of 23, 250 and 270 tokens put windows across the step's
256-key attention partitions, in prompt rows and in decodes. A model whose every layer slides
(Mistral) runs there too, with the blocks behind its window released. tests/test_gemma.py holds both
paths to transformers.

Gemma 3's shapes (4 heads, intermediate 160) make every matrix row a multiple of 32 long, so each
projection is Q8_0 and runs natively (the test factory's 6 x 40 heads give an F16 output projection).
"""

from __future__ import annotations

import random

import pytest
import test_native_decode as native_helpers  # tests/ is on sys.path: its helpers

from flashdecode import LLM, SamplingParams
from flashdecode.layers.attention import SoftmaxPolicy

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py

GEMMA3_NATIVE_SHAPES = dict(num_attention_heads=4, intermediate_size=160)
WINDOW = 8  # tests/model_factory.py's Gemma windows
PROMPT_LENS = (23, 250, 270)
PARAMS = SamplingParams(temperature=0, max_tokens=16, logprobs=3, prompt_logprobs=3, ignore_eos=True)


def prompts() -> list[dict]:
    rng = random.Random(0)
    return [{"prompt_token_ids": [rng.randrange(500) for _ in range(n)]} for n in PROMPT_LENS]


def make_llm(gguf_model, arch: str, **kwargs) -> LLM:
    shapes = GEMMA3_NATIVE_SHAPES if arch == "gemma3" else {}
    options = dict(max_model_len=512, num_threads=1, kv_cache_bytes=16 << 20, numerics="exact")
    return LLM(model=str(gguf_model(arch, "Q8_0", **shapes)), **(options | kwargs))


def assert_same_requests(native: list, python: list, tol: float) -> None:
    """Generated tokens and log-probabilities, and every prompt row's log-probabilities."""
    native_helpers.assert_same([o.outputs[0] for o in native], [o.outputs[0] for o in python], tol)
    for a, b in zip(native, python, strict=True):
        for pa, pb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True):
            native_helpers.assert_same_logprobs(pa, pb, tol)


def both_paths(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> tuple[list, list]:
    def outputs() -> list:
        return llm.generate(prompts(), PARAMS)

    native = outputs()
    assert native_helpers.used_native(llm)
    return native, native_helpers.python_layers_outputs(llm, monkeypatch, outputs)


# fp32 KV: the two paths differ in summation order only. A 16-bit cache rounds the step's K and V, and
# where the paths' fp32 values differ by an ulp the rounding can go either way: 2^-11 of a key
# element in fp16, which these random models carry to a few 1e-4 in a log-probability
@pytest.mark.parametrize(("arch", "kv", "tol"), [("gemma2", "auto", 2e-4), ("gemma3", "f16", 2e-3)])
def test_native_step_is_the_python_layers(arch, kv, tol, gguf_model, native_kernels, monkeypatch) -> None:
    llm = make_llm(gguf_model, arch, kv_cache_dtype=kv)
    spec = llm.engine.model.spec
    assert spec.sliding_window == WINDOW and max(PROMPT_LENS) > 256 + WINDOW
    assert {spec.window_at(i) for i in range(spec.num_layers)} == {WINDOW, None}
    assert_same_requests(*both_paths(llm, monkeypatch), tol=tol)


def test_chunked_prompts_beside_decodes(gguf_model, native_kernels, monkeypatch) -> None:
    """Prompt chunks of at most 48 rows (windows starting in the cached part) in steps with other
    sequences' decodes, and a repeated prompt over prefix-cached blocks, on Gemma 3's two RoPE tables."""
    llm = make_llm(gguf_model, "gemma3", max_num_batched_tokens=48, enable_prefix_caching=True)
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=2, ignore_eos=True)
    requests = prompts() + prompts()[1:2]

    def outputs() -> list:
        return [o.outputs[0] for o in llm.generate(requests, params)]

    native = outputs()
    assert any(key[0] > 1 for key, step in llm.engine.model.native._chosen.items() if step is not None)
    native_helpers.assert_same(native, native_helpers.python_layers_outputs(llm, monkeypatch, outputs), 2e-4)
    assert llm.engine.stats().prefix_cache_hits > 0


def test_unified_softmax_with_soft_cap(gguf_model, native_kernels, monkeypatch) -> None:
    """Gemma 2's capped scores (|s| <= 2) under the unified max: phi = 80 is capped to 2 in every layer
    and no row falls back; phi = -70 puts every row outside the window, each recomputed exactly (with
    its cap and window). Both give the Python layers' results."""
    llm = make_llm(gguf_model, "gemma2", softmax="unified")
    model = llm.engine.model
    for phi, all_fall_back in ((80.0, False), (-70.0, True)):
        model.softmax = SoftmaxPolicy("unified", phi=phi)
        native, python = both_paths(llm, monkeypatch)
        assert_same_requests(native, python, tol=2e-4)
        checked, fallbacks = model.softmax.rows_checked, model.softmax.fallbacks
        tokens = sum(PROMPT_LENS) + len(PROMPT_LENS) * (PARAMS.max_tokens - 1)
        assert checked == 2 * tokens * model.spec.num_heads * model.spec.num_layers  # both paths' rows
        assert fallbacks == (checked if all_fall_back else 0)


def test_every_layer_sliding_with_released_blocks(hf_model, native_kernels, monkeypatch) -> None:
    """Mistral with a window of 16 on every layer (weights quantized to Q8_0 at load): the cache
    releases the blocks behind each sequence's window, and the native step, reading only the window's
    keys, gives the Python layers' tokens while generating far past it."""
    llm = LLM(
        model=str(hf_model("mistral", sliding_window=16)),
        quantization="int8",
        max_model_len=256,
        num_threads=1,
        kv_block_size=16,
        kv_cache_bytes=16 << 20,
        numerics="exact",
    )
    assert llm.engine.model.spec.cache_sliding_window == 16
    params = SamplingParams(temperature=0, max_tokens=64, logprobs=2, ignore_eos=True)
    requests = prompts()[:1] + [{"prompt_token_ids": p["prompt_token_ids"][:40]} for p in prompts()[1:]]

    def outputs() -> list:
        return [o.outputs[0] for o in llm.generate(requests, params)]

    native = outputs()
    assert native_helpers.used_native(llm)
    native_helpers.assert_same(native, native_helpers.python_layers_outputs(llm, monkeypatch, outputs), 2e-4)


def test_drafted_rows_are_plain_decoding_bits(gguf_model, native_kernels) -> None:
    """n-gram speculation on Gemma 2 under the default numerics (int8 activations): verified drafts are
    rows of a chunk, whose windows cut the step's partitions as a lone decode's do, so tokens and
    log-probabilities are plain decoding's bits, past the 256-key partition boundary."""
    pattern = list(range(3, 13))
    requests = [{"prompt_token_ids": pattern * 25}, {"prompt_token_ids": pattern * 3}]
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=2, ignore_eos=True)
    options = dict(max_model_len=512, num_threads=1, kv_cache_bytes=16 << 20)
    path = str(gguf_model("gemma2", "Q8_0"))
    plain = LLM(model=path, **options).generate(requests, params)
    spec = LLM(model=path, speculative={"method": "ngram", "num_speculative_tokens": 4}, **options)
    got = spec.generate(requests, params)
    assert spec.stats().spec_num_draft_tokens > 0 and native_helpers.used_native(spec)
    native_helpers.assert_same([o.outputs[0] for o in got], [o.outputs[0] for o in plain], tol=0.0)
