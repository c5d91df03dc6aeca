"""The native model step (kernels/cpu/decode_step.c via models/native_decode.py) against the Python
layers it replaces: same greedy tokens and the same log-probabilities to fp32 rounding, on random
models of every family feature it covers (GQA, q/k/v biases, per-head q/k norms, head_dim !=
hidden / heads, partial rotary), every KV storage it reads, batches of unequal contexts split into
several attention partitions, both softmax modes, and int8 activations."""

from __future__ import annotations

import pytest
import torch

from flashdecode import LLM, SamplingParams
from flashdecode.kernels import cpu
from flashdecode.layers.attention import SoftmaxPolicy
from flashdecode.layers.linear import iter_linears
from flashdecode.models.native_decode import STEP_KERNELS, NativeDecode

# one short prompt and two long enough for several attention partitions of 128+ keys
PROMPTS = [
    "The engine",
    "Decoding is memory bound: each step reads every weight once, " * 12,
    "A softmax " * 60,
]
GREEDY = SamplingParams(temperature=0, max_tokens=20, logprobs=3, ignore_eos=True)
# the fp32 path, whose native and Python forms agree to summation order (int8 activations are set
# by hand where tested: the default would round them, and a 1-ulp difference can move a rounding)
EXACT = dict(numerics="exact")


def run(llm: LLM, prompts=PROMPTS) -> list:
    return [o.outputs[0] for o in llm.generate(prompts, GREEDY)]


def python_layers_outputs(llm: LLM, monkeypatch: pytest.MonkeyPatch, fn) -> list:
    """What ``fn()`` returns with every step on the Python layers (the native step declines)."""
    with monkeypatch.context() as m:
        m.setattr(NativeDecode, "step", lambda self, *args: None)
        return fn()


def python_layers(llm: LLM, monkeypatch: pytest.MonkeyPatch, prompts=PROMPTS) -> list:
    """The same requests through the Python layers."""
    return python_layers_outputs(llm, monkeypatch, lambda: run(llm, prompts))


def assert_same_logprobs(la: dict, lb: dict, tol: float) -> None:
    """The same top tokens with log-probabilities within tol, but for a tie at the cut: a token in
    one top-k only must be within tol of the token holding its rank in the other (summation order
    decides such a tie)."""
    for tok in la.keys() & lb.keys():
        assert abs(la[tok].logprob - lb[tok].logprob) <= tol, (tok, la[tok], lb[tok])
    for mine, other in ((la, lb), (lb, la)):
        by_rank = {p.rank: p for p in other.values()}
        for tok in mine.keys() - other.keys():
            rival = by_rank.get(mine[tok].rank)
            assert rival is not None, (tok, mine[tok], other)
            assert abs(mine[tok].logprob - rival.logprob) <= tol, (tok, mine[tok], rival)


def assert_same(native: list, python: list, tol: float) -> None:
    for a, b in zip(native, python, strict=True):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs, strict=True):
            assert_same_logprobs(la, lb, tol)


def used_native(llm: LLM) -> bool:
    return bool(llm.engine.model.native._steps)


# With a 16-bit KV cache the two sides' 1-ulp fp32 differences in a key or value can land on either
# side of a 16-bit rounding (one bf16 ulp is 2^-8 relative), and a short context averages few keys:
# which instruction set's tile order the projections use decides whether a test's prompts hit one.
KV16_TOL = 3e-3

CASES = [
    ("llama", "Q8_0", "auto"),  # GQA 6:2, fp32 KV
    ("qwen2", "Q4_0", "bf16"),  # q/k/v biases
    ("qwen3", "Q8_0", "f16"),  # per-head q/k norms, head_dim != hidden / heads
    ("mistral", "Q4_1", "f16"),
    ("llama3", "Q5_0", "auto"),  # repacked into Q5_K's planes; Llama-3 RoPE scaling
]


@pytest.mark.parametrize(("arch", "tensor_type", "kv"), CASES)
def test_native_step_is_the_python_layers(
    arch, tensor_type, kv, gguf_model, native_kernels, monkeypatch
) -> None:
    llm = LLM(
        model=str(gguf_model(arch, tensor_type)), max_model_len=512, num_threads=2, kv_cache_dtype=kv, **EXACT
    )
    native = run(llm)
    assert used_native(llm)
    assert_same(native, python_layers(llm, monkeypatch), tol=2e-4 if kv == "auto" else KV16_TOL)


def test_partial_rotary(gguf_model, native_kernels, monkeypatch) -> None:
    llm = LLM(model=str(gguf_model("phi3-partial", "Q8_0")), max_model_len=256, num_threads=2, **EXACT)
    prompts = [
        PROMPTS[0],
        "Decoding is memory bound: each step reads every weight once, " * 6,
    ]  # 256 positions
    native = run(llm, prompts)
    assert used_native(llm)
    assert_same(native, python_layers(llm, monkeypatch, prompts), tol=2e-4)


def test_unified_softmax_and_its_fallbacks(gguf_model, native_kernels, monkeypatch) -> None:
    llm = LLM(
        model=str(gguf_model("llama", "Q8_0")), max_model_len=512, num_threads=2, softmax="unified", **EXACT
    )
    reference = python_layers(llm, monkeypatch)
    model = llm.engine.model
    model.softmax.reset_counters()
    assert_same(run(llm), reference, tol=2e-4)
    assert used_native(llm)
    assert model.softmax.rows_checked > 0 and model.softmax.fallbacks == 0
    # phi far below every logit: e^(x - phi) leaves the window on every row, each recomputed exactly
    model.softmax = SoftmaxPolicy("unified", phi=-70.0)
    assert_same(run(llm), reference, tol=2e-4)
    assert model.softmax.fallbacks == model.softmax.rows_checked > 0


K_QUANT_SHAPES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize(
    ("kernel", "tensor_type"),
    [
        ("native_q8", "Q8_0"),
        ("native_i8", "Q8_0"),
        ("native_i8", "Q4_K"),
        ("native_i8", "Q6_K"),
        ("native_i8", "Q2_K"),
        ("native_i8", "Q5_0"),
    ],
)
def test_int8_activations(kernel: str, tensor_type: str, gguf_model, native_kernels, monkeypatch) -> None:
    """Both int8-activation kernels inside the step: on the stored planes and on the rows-interleaved
    repack (q/k/v biases; Q8_0, the K-quants (rows of 256), Q5_0 in Q5_K's planes)."""
    if not (native_kernels.has_i8 if kernel == "native_i8" else native_kernels.has_q8):
        pytest.skip(f"{native_kernels.isa} build: no {kernel}")
    shapes = K_QUANT_SHAPES if tensor_type.endswith("_K") else {}
    path = gguf_model("qwen2", tensor_type, **shapes)
    llm = LLM(model=str(path), max_model_len=512, num_threads=2, **EXACT)
    assert {lin.format for layer in llm.engine.model.layers for lin in layer.linears()} <= {
        tensor_type,
        "Q5_K",
    }
    for lin in iter_linears(llm.engine.model.linears()):
        lin.set_plan([(1, kernel)])
        if kernel == "native_i8" and lin.format in ("Q4_K", "Q6_K"):  # the file's two-level scales
            assert cpu.i8_format(lin.format, lin.i8_repack()) == f"{lin.format}_I8"
    native = run(llm)
    assert used_native(llm)
    modes = next(iter(llm.engine.model.native._steps))[0]
    assert set(modes) == {STEP_KERNELS[kernel]}  # every projection ran with this kernel
    # the same rounding on both sides, but a 1-ulp difference in a normalised activation can move one
    # int8 rounding, which these tiny random models amplify (int8 activations move their
    # log-probabilities by up to 1 against fp32): a looser bound than the exact path's
    assert_same(native, python_layers(llm, monkeypatch), tol=0.15)


def test_prompt_chunks_and_mixed_steps(gguf_model, native_kernels, monkeypatch) -> None:
    """Prompt chunks run in the native step too: rows of one sequence share its key slots, each seeing
    its own prefix. Small steps split the long prompts into chunks over a cached prefix and mix them
    with other sequences' decodes; a repeated prompt starts from prefix-cached blocks. Prompt
    log-probabilities (every prompt row's hidden state) and generated tokens match the Python layers."""
    llm = LLM(
        model=str(gguf_model("llama", "Q8_0")),
        max_model_len=512,
        num_threads=2,
        max_num_batched_tokens=48,
        enable_prefix_caching=True,
        **EXACT,
    )
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=2, prompt_logprobs=2, ignore_eos=True)
    prompts = PROMPTS + [PROMPTS[1]]  # the repeat hits the prefix cache

    def outputs() -> list:
        return llm.generate(prompts, params)

    native = outputs()
    assert used_native(llm) and any(key[0] > 1 for key in llm.engine.model.native._chosen)
    python = python_layers_outputs(llm, monkeypatch, outputs)
    for a, b in zip(native, python, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for pa, pb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True):
            assert_same_logprobs(pa, pb, 2e-4)
    assert_same([o.outputs[0] for o in native], [o.outputs[0] for o in python], tol=2e-4)


def test_a_row_is_computed_alike_in_any_step(gguf_model, native_kernels, monkeypatch) -> None:
    """A sequence's tokens and log-probabilities are the same bits whether it decodes alone or beside
    others, and with int8 activations too (attention partitions are fixed in keys, never sized by the
    step): what keeps speculative decoding's greedy output that of plain decoding. And on one thread
    or two: what lets utils/threads.py pick a step's team size by its time alone."""
    monkeypatch.setenv("FLASHDECODE_ADAPTIVE_THREADS", "0")  # two threads means two, not a probe's one
    llm = LLM(model=str(gguf_model("llama", "Q8_0")), max_model_len=512, num_threads=2)
    alone = run(llm, PROMPTS[1:2])
    beside = run(llm, PROMPTS)[1:2]
    assert_same(alone, beside, tol=0.0)
    # two partitions of keys: one thread has items to spare and runs a partition's kv heads as one
    # item, two threads run them one by one
    long = ["A softmax " * 60]  # 301 tokens
    two = run(llm, long)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run(llm, long)
    finally:
        torch.set_num_threads(threads)
    assert_same(one, two, tol=0.0)


@pytest.mark.parametrize("softmax", ["exact", "unified"])
@pytest.mark.parametrize(
    "arch", ["llama", "llama3", "mistral", "phi3"]
)  # 3, 1, 4 and 4 query heads a kv head
def test_a_prompt_row_is_computed_alike_in_any_chunk(arch, softmax, gguf_model, native_kernels) -> None:
    """A prompt row's attention has the same bits whichever rows of its chunk attend beside it (groups
    of up to four rows, their query heads paired and their V products run side by side): the prompt's
    log-probabilities under whole, 7- and 5-token chunks (groups of 4 and 3, of 4 and 1, at other
    offsets) are equal. The prompt spans two attention partitions, ends in a partial key block, and the
    models' query heads per kv head and head sizes (16, 32, 24) give odd query counts and partial
    vector lanes. (Steps of at most four rows are left out: on some of these shapes their rows differ
    in the last bit outside attention, the first row too, which attends to one key alone.)"""
    prompt = ["A softmax " * 60]
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2, ignore_eos=True)
    model = str(gguf_model(arch, "Q8_0"))

    def prompt_logprobs(chunk: int) -> list:
        llm = LLM(
            model=model,
            max_model_len=512,
            num_threads=2,
            max_num_batched_tokens=chunk,
            softmax=softmax,
            enable_prefix_caching=False,
            **EXACT,
        )
        out = llm.generate(prompt, params)[0]
        assert used_native(llm)
        return out.prompt_logprobs[1:]

    whole = prompt_logprobs(512)
    for chunk in (7, 5):
        for pa, pb in zip(whole, prompt_logprobs(chunk), strict=True):
            assert_same_logprobs(pa, pb, 0.0)


def test_a_plan_change_forgets_the_team_sizes_timed(gguf_model, native_kernels) -> None:
    """The team sizes utils/threads.py chose were timed on the old kernels: a plan change (the held-out
    check's exact pass, then int8) starts their record afresh, and steps on other kernels never share
    one."""
    from flashdecode.engine.numerics import use_exact_kernels  # noqa: PLC0415

    llm = LLM(model=str(gguf_model("llama", "Q8_0")), max_model_len=512, num_threads=2)
    run(llm, PROMPTS[:1])
    native = llm.engine.model.native
    before = native.team
    assert before._shapes and all(isinstance(key, tuple) for key in before._shapes)
    use_exact_kernels(llm.engine.model)
    out = run(llm, PROMPTS[:1])
    assert native.team is not before and native.team._shapes and out[0].token_ids
