"""flashdecode against transformers on the random reference models of tests/model_factory.py.

fp32 end to end: the top-5 logprobs at every prompt position and every generated position must equal
transformers' forward pass (max abs diff < 1e-3, same token ids, same ranks), and 32 greedy tokens
must equal ``model.generate(do_sample=False)``. Prompts span several KV blocks (40 tokens, block size
16) and generation crosses block boundaries (40 + 32 = 72 tokens: blocks 3, 4 and 5); a 32-token prompt
fills its two blocks exactly, so its first generated token opens a new one. Three prompts of different
lengths run in one batch.

The factory itself is validated against transformers alone in tests/test_model_factory.py, so a
failure here points at the engine.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import model_factory as mf
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402

MAX_TOKENS = 32
PROMPT_LENS = (40, 23, 32)  # 32: the prompt fills its blocks exactly
TOP = 5
TOL = 1e-3
# Two candidates closer than this in the reference are a tie: either order is right.
TIE = 1e-4
KV_BLOCK = 16
# 16 MiB of KV cache (thousands of blocks for these models) instead of the engine's 2 GiB default, whose
# per-block bookkeeping costs 0.3-0.6 s of start-up per engine: this suite builds about twenty engines.
KV_BYTES = 16 << 20


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py


def make_llm(path: Path, **kwargs: Any) -> Any:
    from flashdecode import LLM

    # exact numerics: the parity tests judge the stored weights' arithmetic (engine/numerics.py)
    options = dict(
        dtype="float32",
        max_model_len=256,
        kv_block_size=KV_BLOCK,
        kv_cache_bytes=KV_BYTES,
        num_threads=1,
        numerics="exact",
    )
    return LLM(model=str(path), **{**options, **kwargs})


def prompts_for(vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # ordinary tokens only: the special ids sit at the top of the vocabulary
    return [[rng.randrange(vocab_size - len(mf.SPECIAL_TOKENS)) for _ in range(n)] for n in PROMPT_LENS]


def sampling_params(max_tokens: int = MAX_TOKENS) -> Any:
    from flashdecode import SamplingParams

    return SamplingParams(
        temperature=0, max_tokens=max_tokens, logprobs=TOP, prompt_logprobs=TOP, ignore_eos=True
    )


# ---------------------------------------------------------------------------------------------
# the engine and the reference, each run once per model


_ENGINE_RUNS: dict[tuple[Any, ...], list[Any]] = {}


def run_engine(model_path: Path, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[Any]:
    key = (str(model_path), tuple(tuple(p) for p in prompts), max_tokens)
    if key not in _ENGINE_RUNS:
        llm = make_llm(model_path)
        try:
            _ENGINE_RUNS[key] = llm.generate(
                [{"prompt_token_ids": p} for p in prompts], sampling_params(max_tokens)
            )
        finally:
            del llm
    return _ENGINE_RUNS[key]


@torch.no_grad()
def reference_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    """log_softmax of the logits at every position of ``ids`` ([len(ids), vocab], fp32)."""
    return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


@torch.no_grad()
def reference_greedy(model: Any, prompt: list[int]) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=MAX_TOKENS,
        eos_token_id=None,  # as a kwarg: a GenerationConfig's None is overridden by the model's eos
        pad_token_id=0,
    )[0, len(prompt) :].tolist()
    assert len(out) == MAX_TOKENS, "reference generation stopped early: eos was not disabled (test bug)"
    return out


# ---------------------------------------------------------------------------------------------
# comparisons


def check_position(where: str, got: dict[int, Any] | None, ref: torch.Tensor, actual: int) -> None:
    """``got``: the engine's {token_id: Logprob} at one position; ``ref``: the reference log-probs
    there; ``actual``: the prompt token / sampled token that must be in ``got`` besides the top-5."""
    assert got is not None, f"{where}: no logprobs"
    assert actual in got, f"{where}: token {actual} missing from {sorted(got)}"
    top = ref.topk(TOP + 1)
    ref_top = top.indices[:TOP].tolist()
    boundary_tie = float(top.values[TOP - 1] - top.values[TOP]) < TIE
    got_top = {t for t, lp in got.items() if lp.rank is not None and lp.rank <= TOP}
    assert len(got) == TOP + (actual not in got_top), (
        f"{where}: {len(got)} entries {sorted(got)}, want the top-{TOP} plus the actual token {actual}"
    )
    if boundary_tie:  # the 5th and 6th candidates tie: compare the first four, and the rest by value
        assert set(ref_top[: TOP - 1]) <= got_top, f"{where}: top-{TOP} ids {sorted(got_top)} vs {ref_top}"
    else:
        assert got_top == set(ref_top), f"{where}: top-{TOP} ids {sorted(got_top)} vs reference {ref_top}"
    for token, lp in got.items():
        want = float(ref[token])
        assert math.isfinite(lp.logprob), f"{where}: token {token} logprob {lp.logprob}"
        assert abs(lp.logprob - want) < TOL, (
            f"{where}: token {token} logprob {lp.logprob:.6f} vs reference {want:.6f} "
            f"(diff {abs(lp.logprob - want):.2e})"
        )
        # rank 1 = most likely; candidates within TIE of this one may be ordered either way
        best_rank = int((ref > ref[token] + TIE).sum()) + 1
        worst_rank = int((ref > ref[token] - TIE).sum())
        assert lp.rank is not None and best_rank <= lp.rank <= worst_rank, (
            f"{where}: token {token} rank {lp.rank} vs reference {int((ref > ref[token]).sum()) + 1}"
        )


def check_request(
    out: Any,
    prompt: list[int],
    ref_model: Any,
    label: str,
    prompt_logprobs: bool = True,
    max_tokens: int = MAX_TOKENS,
) -> None:
    assert list(out.prompt_token_ids) == prompt
    completion = out.outputs[0]
    tokens = list(completion.token_ids)
    assert len(tokens) == max_tokens, f"{label}: {len(tokens)} tokens generated, asked {max_tokens}"
    assert completion.finish_reason == "length"
    full = prompt + tokens
    ref = reference_logprobs(ref_model, full)

    plp = out.prompt_logprobs
    if prompt_logprobs:
        assert plp is not None and len(plp) == len(prompt), f"{label}: prompt_logprobs length"
        assert plp[0] is None, f"{label}: the first prompt position has no logprob"
        for i in range(1, len(prompt)):
            check_position(f"{label} prompt position {i}", plp[i], ref[i - 1], prompt[i])

    assert completion.logprobs is not None and len(completion.logprobs) == max_tokens
    for j, token in enumerate(tokens):
        pos = len(prompt) - 1 + j
        where = f"{label} generated token {j} (position {pos + 1}, KV block {(pos + 1) // KV_BLOCK})"
        check_position(where, completion.logprobs[j], ref[pos], token)
        # greedy: what was sampled is the reference argmax, up to a tie
        best = float(ref[pos].max())
        assert float(ref[pos][token]) > best - TIE, (
            f"{where}: sampled {token} ({float(ref[pos][token]):.5f}) but reference argmax is "
            f"{int(ref[pos].argmax())} ({best:.5f})"
        )
    # cumulative_logprob (reported whenever logprobs are, as here) is the sum of the sampled tokens'
    assert completion.cumulative_logprob is not None, f"{label}: no cumulative_logprob"
    want = sum(float(ref[len(prompt) - 1 + j][t]) for j, t in enumerate(tokens))
    assert abs(completion.cumulative_logprob - want) < TOL * max_tokens


def check_greedy(out: Any, prompt: list[int], ref_model: Any, label: str) -> None:
    got = list(out.outputs[0].token_ids)
    want = reference_greedy(ref_model, prompt)
    if got != want:
        j = next(k for k, (a, b) in enumerate(zip(got, want)) if a != b)
        ref = reference_logprobs(ref_model, prompt + want)[len(prompt) - 1 + j]
        gap = float(ref[want[j]] - ref[got[j]])
        # a genuine tie in the reference would excuse a divergence; with these seeds there is none
        assert gap < TIE, (
            f"{label}: greedy tokens diverge at step {j} (position {len(prompt) + j}): engine {got[j]}, "
            f"transformers {want[j]}, reference logprob gap {gap:.2e}\nengine {got}\nhf     {want}"
        )


def run_parity(model_path: Path, ref_model: Any, label: str, greedy: bool = False) -> None:
    """Logprobs everywhere (check_request). check_request also asserts that every sampled token is the
    reference argmax given the same prefix, which by induction makes the engine's tokens transformers'
    greedy sequence; ``greedy`` additionally runs ``model.generate`` (test (b) does, per family)."""
    prompts = prompts_for(ref_model.config.vocab_size)
    outs = run_engine(model_path, prompts)
    assert len(outs) == len(prompts)
    for k, (out, prompt) in enumerate(zip(outs, prompts)):
        check_request(out, prompt, ref_model, f"{label} request {k}")
        if greedy:
            check_greedy(out, prompt, ref_model, f"{label} request {k}")


# ---------------------------------------------------------------------------------------------
# the tests


@pytest.mark.parametrize("arch", mf.ARCHS)
def test_logprobs_match_transformers(arch: str, hf_model: Callable[..., Path], hf_reference: Any) -> None:
    """(a) top-5 logprobs at every prompt and generated position, HF safetensors folder."""
    run_parity(hf_model(arch), hf_reference(arch), arch)


@pytest.mark.parametrize("arch", mf.ARCHS)
def test_greedy_matches_transformers_generate(
    arch: str, hf_model: Callable[..., Path], hf_reference: Any
) -> None:
    """(b) 32 greedy tokens equal ``model.generate(do_sample=False)`` (eos ignored on both sides)."""
    prompts = prompts_for(hf_reference(arch).config.vocab_size)
    outs = run_engine(hf_model(arch), prompts)
    for k, (out, prompt) in enumerate(zip(outs, prompts)):
        check_greedy(out, prompt, hf_reference(arch), f"{arch} request {k}")


def test_sharded_safetensors(hf_model: Callable[..., Path], hf_reference: Any) -> None:
    """(c) a model saved in several safetensors shards with an index loads to the same model."""
    path = hf_model("llama", shards=True)
    assert len(list(path.glob("model-*.safetensors"))) > 2
    # same seed, same weights as the unsharded model (test_model_factory.py checks it)
    run_parity(path, hf_reference("llama"), "llama sharded", greedy=True)


@pytest.mark.parametrize("arch", mf.ARCHS)
def test_gguf_f32_matches_transformers(arch: str, gguf_model: Callable[..., Path], hf_reference: Any) -> None:
    """(d) GGUF F32 as llama.cpp's converter writes it: Q/K rows permuted for llama/llama3/mistral,
    Llama-3 RoPE scaling as the rope_freqs tensor. F32 stores the weights exactly, so the reference is
    the original HF model."""
    run_parity(gguf_model(arch), hf_reference(arch), f"{arch} gguf F32")


QUANTIZED = [
    ("llama", "Q8_0", {}),
    ("qwen2", "Q8_0", {}),
    ("llama", "Q4_K", mf.KQUANT_OVERRIDES),
    ("llama", "Q6_K", mf.KQUANT_OVERRIDES),
    ("llama", "Q2_K", mf.KQUANT_OVERRIDES),
]


@pytest.mark.parametrize(
    ("arch", "tensor_type", "overrides"), QUANTIZED, ids=[f"{a}-{t}" for a, t, _ in QUANTIZED]
)
def test_quantized_gguf_matches_transformers_dequantized(
    arch: str, tensor_type: str, overrides: dict[str, Any], gguf_model: Callable[..., Path]
) -> None:
    """(d) a quantized GGUF matches transformers running the same file (which dequantizes every tensor
    with gguf-py): the engine's quantized weights must decode to the same values."""
    from flashdecode.layers.quant import QuantizedTensor
    from flashdecode.models.loader import load_model

    path = gguf_model(arch, tensor_type, **overrides)
    # every projection runs in its stored format (K-quants repacked exactly), none inflated to float
    weights = load_model(path).weights
    assert {w.format for w in weights.values() if isinstance(w, QuantizedTensor)} == {tensor_type}
    assert isinstance(weights["layers.0.down"], QuantizedTensor)
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    run_parity(path, ref, f"{arch} gguf {tensor_type}")


def test_prefix_cache_hits_match_transformers(hf_model: Callable[..., Path], hf_reference: Any) -> None:
    """The same prompts twice on one engine: the second run takes the full prompt blocks from the prefix
    cache (requests without prompt_logprobs, which would bypass the cache as in vLLM) and must sample
    the same tokens with the same logprobs."""
    from flashdecode import SamplingParams

    path, ref = hf_model("qwen2"), hf_reference("qwen2")
    prompts = prompts_for(ref.config.vocab_size, seed=7)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=TOP, ignore_eos=True)
    llm = make_llm(path)
    first = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    second = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert [o.num_cached_tokens for o in first] == [0] * len(prompts)
    # every full block but the one holding the last prompt token (its logits are needed)
    assert [o.num_cached_tokens for o in second] == [(len(p) - 1) // KV_BLOCK * KV_BLOCK for p in prompts]
    for k, (out, prompt) in enumerate(zip(second, prompts)):
        assert out.prompt_logprobs is None
        check_request(out, prompt, ref, f"qwen2 cached request {k}", prompt_logprobs=False)
        assert list(out.outputs[0].token_ids) == list(first[k].outputs[0].token_ids)


def test_decoded_tokens_are_the_tokens_text(hf_model: Callable[..., Path], hf_reference: Any) -> None:
    """Logprob.decoded_token is the candidate token's text (vLLM fills it when detokenizing)."""
    from transformers import AutoTokenizer

    path = hf_model("llama")
    tok = AutoTokenizer.from_pretrained(path)
    out = run_engine(path, prompts_for(hf_reference("llama").config.vocab_size))[0]
    entries = out.prompt_logprobs[1:] + out.outputs[0].logprobs
    checked = 0
    for d in entries:
        for token, lp in d.items():
            text = tok.decode([token])
            if text.isascii():  # partial UTF-8 sequences decode to U+FFFD, a representation choice
                assert lp.decoded_token == text, (token, lp.decoded_token, text)
                checked += 1
    assert checked > 100


TEXTS = [
    "The engine reads 12345 tokens, naïvely!  Привет 你好 🙂\n\n  def f(x):\n\treturn x'll",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "3.14159 and 2024-03-17 they've",
]


@pytest.mark.parametrize("source", ["hf", "gguf"])
@pytest.mark.parametrize("arch", ["llama3", "qwen2"])
def test_text_prompts_tokenize_as_transformers(
    arch: str, source: str, hf_model: Callable[..., Path], gguf_model: Callable[..., Path]
) -> None:
    """Text prompts and chat: the engine's tokenizer (from tokenizer.json, or rebuilt from the GGUF's
    "gpt2" vocabulary, merges and pre-tokenizer name) gives transformers' ids, BOS included."""
    from transformers import AutoTokenizer

    from flashdecode import SamplingParams

    tok = AutoTokenizer.from_pretrained(hf_model(arch))
    llm = make_llm(hf_model(arch) if source == "hf" else gguf_model(arch))
    params = SamplingParams(temperature=0, max_tokens=1)
    for text, out in zip(TEXTS, llm.generate(TEXTS, params)):
        assert list(out.prompt_token_ids) == tok(text)["input_ids"], text
    conversation = [{"role": "user", "content": "hi there"}]
    want = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert list(llm.chat(conversation, params)[0].prompt_token_ids) == list(want)


@pytest.mark.parametrize("arch", mf.ARCHS)
def test_long_context(arch: str, hf_model: Callable[..., Path], hf_reference: Any) -> None:
    """Near max_model_len (256): a 200-token prompt (12.5 blocks) and 48 generated tokens. Large
    positions are where RoPE errors (base, Llama-3 scaling, head_dim) grow."""
    ref = hf_reference(arch)
    prompt = prompts_for(ref.config.vocab_size, seed=11)[0] * 5  # 200 tokens
    out = run_engine(hf_model(arch), [prompt], max_tokens=48)[0]
    check_request(out, prompt, ref, f"{arch} long", max_tokens=48)


def test_many_prompts_of_mixed_lengths(hf_model: Callable[..., Path], hf_reference: Any) -> None:
    """Nine requests in one batch, 1 to 70 tokens: a one-token prompt (prompt_logprobs == [None]),
    prompts ending exactly on (16, 48) and just past (17) a block boundary, and prompts longer than
    others' whole sequences, so prefill and decode steps mix."""
    ref = hf_reference("qwen3")
    rng = random.Random(3)
    lengths = [1, 16, 17, 2, 48, 70, 5, 33, 9]
    prompts = [[rng.randrange(ref.config.vocab_size - 4) for _ in range(n)] for n in lengths]
    outs = run_engine(hf_model("qwen3"), prompts, max_tokens=20)
    assert outs[0].prompt_logprobs == [None]
    for k, (out, prompt) in enumerate(zip(outs, prompts)):
        check_request(out, prompt, ref, f"qwen3 mixed request {k} (prompt {len(prompt)})", max_tokens=20)


BF16_TOL = 0.15  # measured max |difference| 0.09 (mean 0.025): each side is ~0.1 from fp32 at worst
BF16_MARGIN = 0.1  # the fp32 reference's top-1 leads its runner-up by at least this at every step


def test_bf16_checkpoint_computes_in_bf16_and_matches_transformers_bf16(
    hf_model: Callable[..., Path], hf_reference: Any, tmp_path: Path
) -> None:
    """A Llama saved in bfloat16 (transformers' own cast and save_pretrained) runs in bf16 with
    dtype="auto": its prompt logprobs are transformers' bf16 forward pass up to bf16 rounding, and its
    16 greedy tokens are transformers' bf16 greedy generate. The prompt is one where transformers' fp32
    and bf16 greedy agree with a clear margin at every step, so rounding alone cannot flip a token."""
    import shutil

    from flashdecode import SamplingParams

    src = hf_model("llama")
    folder = tmp_path / "llama-bf16"
    shutil.copytree(src, folder)  # tokenizer and generation config as they are
    ref16 = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    ref16.save_pretrained(folder)  # config.json now says bfloat16, the weights are bf16
    ref32 = hf_reference("llama")
    rng = random.Random(1)  # seeds 0 and 2 have near-ties (< 0.02 nats) that bf16 rounding flips
    prompt = [rng.randrange(ref32.config.vocab_size - len(mf.SPECIAL_TOKENS)) for _ in range(24)]

    def hf_greedy(model: Any) -> list[int]:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=16,
                eos_token_id=None,
                pad_token_id=0,
            )
        return out[0, len(prompt) :].tolist()

    want = hf_greedy(ref16)
    assert want == hf_greedy(ref32) and len(want) == 16  # the precondition the prompt was chosen for
    top2 = reference_logprobs(ref32, prompt + want)[len(prompt) - 1 : -1].topk(2).values
    assert float((top2[:, 0] - top2[:, 1]).min()) > BF16_MARGIN

    llm = make_llm(folder, dtype="auto")
    assert llm.engine.dtype == torch.bfloat16
    out = llm.generate(
        {"prompt_token_ids": prompt},
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, prompt_logprobs=TOP),
    )[0]
    assert list(out.outputs[0].token_ids) == want

    ref = reference_logprobs(ref16, prompt)  # bf16 logits, log_softmax in fp32
    diffs = []
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for t, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert prompt[t] in entry and len(entry) >= TOP
        diffs += [abs(lp.logprob - float(ref[t - 1, token])) for token, lp in entry.items()]
    assert max(diffs) <= BF16_TOL, max(diffs)
    assert sum(diffs) / len(diffs) < 0.05
