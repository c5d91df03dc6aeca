"""Sliding-window attention in the paged KV cache: where every layer slides within a window W, the
blocks no layer can see any more go back to the pool (engine/block_manager.py), so a sequence holds
about its window's blocks however long it generates; where some layer is global (Gemma 2's
alternating layers) every block stays.

The model: a random Mistral whose config sets ``sliding_window`` 16 (transformers masks it on every
layer), blocks of 4 tokens, 200 greedy tokens after a 20-token prompt. Each run is checked against
transformers' forward pass over the whole sequence with its sliding mask (tests/test_hf_parity.py's
``check_request``: top-5 logprobs within 1e-3 and each sampled token the reference argmax), and the
window is shown to bind: the same weights without the window predict other tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import model_factory as mf
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import test_hf_parity as parity  # noqa: E402

from flashdecode import LLM, SamplingParams  # noqa: E402
from flashdecode.engine.block_manager import NULL_BLOCK  # noqa: E402
from flashdecode.errors import FlashDecodeError  # noqa: E402

WINDOW = 16
BLOCK = 4
PROMPT_LEN = 20
GEN = 200
BUDGET = 16  # max_num_batched_tokens: the prompt goes in two chunks
# a decode row attends to W positions, which span at most ceil(W / block) + 1 blocks
DECODE_BOUND = -(-WINDOW // BLOCK) + 1
# the engine's floor for a windowed model (engine/worker.py max_blocks_per_seq): the W - 1 positions before
# a chunk of up to BUDGET tokens and the chunk, plus a block for alignment; 9 blocks hold 36 tokens,
# far fewer than the 220 of the sequence
MIN_POOL = -(-(WINDOW - 1 + BUDGET) // BLOCK) + 1
BYTES_PER_TOKEN = 2 * 3 * 1 * 16 * 4  # K and V, 3 layers, 1 KV head of 16 dims, fp32

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mf.make_hf_model("mistral", tmp_path_factory.mktemp("swa") / "mistral", sliding_window=WINDOW)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def make_llm(path: Path, **kwargs: Any) -> LLM:
    options = dict(
        dtype="float32",
        max_model_len=256,
        kv_block_size=BLOCK,
        num_threads=1,
        numerics="exact",
        max_num_batched_tokens=BUDGET,
        kv_cache_bytes=64 * BLOCK * BYTES_PER_TOKEN,
    )
    return LLM(model=str(path), **{**options, **kwargs})


def prompt(seed: int = 0, arch: str = "mistral", length: int = PROMPT_LEN) -> list[int]:
    rng = random.Random(seed)
    # ordinary tokens only: the special ids sit at the top of the vocabulary
    vocab = mf.arch_config(arch)["vocab_size"] - len(mf.SPECIAL_TOKENS)
    return [rng.randrange(vocab) for _ in range(length)]


def params(max_tokens: int = GEN) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=parity.TOP, ignore_eos=True)


def held_blocks(llm: LLM) -> int:
    stats = llm.engine.stats()
    return stats.kv_blocks_total - stats.kv_blocks_free


def record_held_blocks(llm: LLM) -> list[tuple[int, int]]:
    """(decode rows, blocks in use) as each step's model run begins: after the scheduler allocated."""
    seen: list[tuple[int, int]] = []
    run = llm.engine.runner.run

    def counted(batch: Any) -> Any:
        seen.append((len(batch.decodes), held_blocks(llm)))
        return run(batch)

    llm.engine.runner.run = counted
    return seen


def check(out: Any, ids: list[int], reference: Any, label: str, max_tokens: int = GEN) -> None:
    parity.check_request(out, ids, reference, label, prompt_logprobs=False, max_tokens=max_tokens)


def test_spec_reads_mistral_window(model_dir: Path) -> None:
    llm = make_llm(model_dir)
    spec = llm.engine.spec
    assert spec.cache_sliding_window == WINDOW
    assert [spec.window_at(i) for i in range(spec.num_layers)] == [WINDOW] * spec.num_layers
    assert llm.engine.block_manager.sliding_window == WINDOW


def test_long_generation_matches_transformers_with_bounded_blocks(model_dir: Path, reference: Any) -> None:
    ids = prompt()
    assert len(ids) + GEN > 10 * WINDOW
    llm = make_llm(model_dir)
    seen = record_held_blocks(llm)
    (out,) = llm.generate({"prompt_token_ids": ids}, params())
    check(out, ids, reference, "windowed")
    decodes = [held for rows, held in seen if rows]
    assert len(decodes) == GEN - 1
    assert max(decodes) <= DECODE_BOUND
    assert max(held for _, held in seen) <= DECODE_BOUND + 1
    # once past the window it holds no fewer than the window needs either
    assert min(decodes[WINDOW:]) >= -(-WINDOW // BLOCK)
    assert held_blocks(llm) == 0
    assert llm.engine.stats().num_preemptions == 0

    # the window binds: without it the same weights predict other tokens
    unwindowed = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, sliding_window=None
    ).eval()
    full = ids + list(out.outputs[0].token_ids)
    with_window = parity.reference_logprobs(reference, full).argmax(-1)
    without = parity.reference_logprobs(unwindowed, full).argmax(-1)
    assert bool((with_window != without).any())


def test_small_pool_completes_the_long_generation(model_dir: Path, reference: Any) -> None:
    ids = prompt(1)
    llm = make_llm(model_dir, kv_cache_bytes=MIN_POOL * BLOCK * BYTES_PER_TOKEN, enable_prefix_caching=False)
    assert llm.engine.block_manager.num_blocks == MIN_POOL
    assert MIN_POOL * BLOCK < len(ids) + GEN
    engine = llm.engine
    engine.add_request("small", {"prompt_token_ids": ids}, params())
    outs = []
    for _ in range(GEN + 2):  # two prefill chunks, then a token a step: never a recompute
        outs += engine.step()
    assert not engine.has_unfinished_requests()
    check(outs[-1], ids, reference, "small pool")
    assert llm.engine.stats().num_preemptions == 0

    with pytest.raises(FlashDecodeError, match="fewer than one sequence may hold"):
        make_llm(model_dir, kv_cache_bytes=(MIN_POOL - 1) * BLOCK * BYTES_PER_TOKEN)


def test_preempted_windowed_sequence_recomputes(model_dir: Path, reference: Any) -> None:
    """Two sequences in a pool that holds one's window but not both: the later one is preempted,
    recomputed from its prompt and what it generated (in windowed chunks), and both match."""
    llm = make_llm(model_dir, kv_cache_bytes=MIN_POOL * BLOCK * BYTES_PER_TOKEN, enable_prefix_caching=False)
    engine = llm.engine
    ids = {"a": prompt(5), "b": prompt(6)}
    gen = 5 * WINDOW
    for name, p in ids.items():
        engine.add_request(name, {"prompt_token_ids": p}, params(gen))
    outs: dict[str, Any] = {}
    for _ in range(20 * gen):  # a bound, so that a scheduler that cannot progress fails, not hangs
        if not engine.has_unfinished_requests():
            break
        outs |= {out.request_id: out for out in engine.step() if out.finished}
    assert engine.stats().num_preemptions > 0
    for name, p in ids.items():
        check(outs[name], p, reference, f"preempted pair, {name}", gen)
    assert held_blocks(llm) == 0


def test_abort_frees_every_block(model_dir: Path) -> None:
    llm = make_llm(model_dir)
    engine = llm.engine
    engine.add_request("a", {"prompt_token_ids": prompt()}, params())
    for _ in range(3 * WINDOW):
        engine.step()
    (seq,) = engine.requests["a"].seqs
    assert seq.block_table[0] == NULL_BLOCK and held_blocks(llm) > 0
    engine.abort("a")
    assert held_blocks(llm) == 0 and not engine.has_unfinished_requests()


@pytest.mark.parametrize("caching", [True, False])
def test_shared_prefix_with_a_windowed_sequence(model_dir: Path, reference: Any, caching: bool) -> None:
    """A second request with the first one's prompt and more arrives while the first decodes far past
    its window (its prompt blocks released, still cached until evicted): both match transformers."""
    first = prompt(2)
    second = first + prompt(3)[:10]
    llm = make_llm(model_dir, enable_prefix_caching=caching)
    engine = llm.engine
    engine.add_request("first", {"prompt_token_ids": first}, params())
    for _ in range(2 * WINDOW):
        engine.step()
    assert engine.requests["first"].seqs[0].block_table[0] == NULL_BLOCK
    engine.add_request("second", {"prompt_token_ids": second}, params())
    outs: dict[str, Any] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
    check(outs["first"], first, reference, f"first, caching={caching}")
    check(outs["second"], second, reference, f"second, caching={caching}")
    hits = engine.stats().prefix_cache_hits
    assert hits == (len(first) // BLOCK if caching else 0)
    assert held_blocks(llm) == 0


def test_speculative_rollback_stays_bounded(model_dir: Path, reference: Any) -> None:
    drafts = 3
    ids = prompt(4)
    llm = make_llm(
        model_dir,
        speculative={"method": "ngram", "num_speculative_tokens": drafts, "prompt_lookup_max": 2},
    )
    seen = record_held_blocks(llm)
    (out,) = llm.generate({"prompt_token_ids": ids}, params())
    check(out, ids, reference, "speculative")
    stats = llm.engine.stats()
    assert stats.spec_num_draft_tokens > stats.spec_num_accepted_tokens > 0  # drafts kept and rejected
    # W positions and the drafts after them
    assert max(held for rows, held in seen if rows) <= -(-(WINDOW + drafts) // BLOCK) + 1
    assert held_blocks(llm) == 0


def test_mixed_model_keeps_every_block() -> None:
    """Gemma 2's global layers see every position: no block may go, and every block stays held."""
    path = mf.cached_hf_model("gemma2")
    llm = make_llm(path, kv_cache_bytes=parity.KV_BYTES, max_num_batched_tokens=64)
    spec = llm.engine.spec
    window = spec.sliding_window
    assert window is not None and spec.cache_sliding_window is None
    engine = llm.engine
    ids = prompt(arch="gemma2", length=window + 2)
    engine.add_request("g", {"prompt_token_ids": ids}, params(max_tokens=6 * window))
    (seq,) = engine.requests["g"].seqs
    while engine.has_unfinished_requests():
        engine.step()
        if seq.is_finished:
            break
        assert NULL_BLOCK not in seq.block_table
        assert held_blocks(llm) == len(seq.block_table) == -(-seq.num_computed_tokens // BLOCK)


def test_roofline_reads_at_most_the_window_on_sliding_layers() -> None:
    from test_roofline import small_spec

    from flashdecode.tools.roofline import ModelCost

    # tests/test_roofline.py's model: 2 layers, 256 KV bytes per token per layer (512 both), 512
    # attention FLOPs per attended position over both layers; here layer 0 slides within 4
    spec = small_spec(sliding_window=4, layer_types=("sliding_attention", "full_attention"))
    step = ModelCost(spec).decode_step(batch=2, context=[3, 10])
    assert step.kv_read_bytes == (3 + 3) * 256 + (4 + 10) * 256
    assert step.flops == 2 * 2 * 80128 + 256 * (3 + 3 + 4 + 10)
    short = ModelCost(small_spec()).decode_step(batch=2, context=[3, 10])
    assert short.kv_read_bytes == 13 * 512  # no window: every position on both layers


# config.json windows of the other families, as transformers applies them (its config classes and
# models): Phi-3 and Mixtral on every layer; Qwen2 only with use_sliding_window, from layer
# max_window_layers on; Qwen2-MoE on even layers below max_window_layers; Qwen3-MoE on every layer.
SHORT_WINDOW = 8
WINDOWED = {
    "phi3": (dict(sliding_window=SHORT_WINDOW), [SHORT_WINDOW] * 2),
    "mixtral": (dict(sliding_window=SHORT_WINDOW), [SHORT_WINDOW] * 2),
    "qwen2": (
        dict(use_sliding_window=True, sliding_window=SHORT_WINDOW, max_window_layers=1),
        [None, SHORT_WINDOW],
    ),
    "qwen2moe": (
        dict(use_sliding_window=True, sliding_window=SHORT_WINDOW, max_window_layers=3),
        [SHORT_WINDOW, None, SHORT_WINDOW],
    ),
    "qwen3moe": (dict(use_sliding_window=True, sliding_window=SHORT_WINDOW), [SHORT_WINDOW] * 2),
}  # fmt: skip


@pytest.mark.parametrize("arch", sorted(WINDOWED))
def test_family_window_matches_transformers(arch: str) -> None:
    """A window shorter than the prompt, on the layers transformers applies it to: top-5 logprobs at
    every prompt and generated position as its forward pass, and the window binds (transformers
    without it predicts other tokens)."""
    overrides, windows = WINDOWED[arch]
    path = mf.cached_hf_model(arch, **overrides)
    llm = make_llm(path, kv_cache_bytes=parity.KV_BYTES, max_num_batched_tokens=64)
    spec = llm.engine.spec
    assert [spec.window_at(i) for i in range(spec.num_layers)] == windows
    ids = prompt(arch=arch, length=5 * SHORT_WINDOW)
    sampling = SamplingParams(
        temperature=0, max_tokens=16, logprobs=parity.TOP, prompt_logprobs=parity.TOP, ignore_eos=True
    )
    (out,) = llm.generate({"prompt_token_ids": ids}, sampling)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    parity.check_request(out, ids, reference, f"{arch} window {SHORT_WINDOW}", max_tokens=16)
    config = transformers.AutoConfig.from_pretrained(path)
    if getattr(config, "layer_types", None):  # Qwen2's and Qwen2-MoE's models read each layer's type
        config.layer_types = ["full_attention"] * config.num_hidden_layers
    else:
        config.sliding_window = None
    unwindowed = transformers.AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=torch.float32
    ).eval()
    full = ids + list(out.outputs[0].token_ids)
    diff = parity.reference_logprobs(reference, full) - parity.reference_logprobs(unwindowed, full)
    assert float(diff.abs().max()) > 0.1


@pytest.mark.parametrize("arch", ["qwen2", "qwen2moe", "qwen3moe"])
def test_qwen_window_needs_use_sliding_window(arch: str) -> None:
    """Qwen's configs name a window that applies only with use_sliding_window (transformers drops it)."""
    from flashdecode.models.safetensors_loader import spec_from_hf_config

    config = json.loads((mf.cached_hf_model(arch) / "config.json").read_text())
    config |= {"sliding_window": SHORT_WINDOW, "use_sliding_window": False}
    spec = spec_from_hf_config(config)
    assert spec.layer_types == () and spec.sliding_window is None
    assert not transformers.AutoConfig.for_model(**config).sliding_window
