"""Tensor and pipeline parallelism over gloo (engine/parallel/, models/tensor_parallel.py,
models/pipeline_parallel.py): spawned ranks of one thread each against the single-process engine,
which tests/test_hf_parity.py holds to transformers.

Greedy tokens must be identical and every logprob within 1e-4, from a Hugging Face folder and from a
quantized GGUF, with several requests batched continuously, chunked prefill and prefix caching on:
T=2 (one KV head, held by both ranks, the Python layers; two, one per rank, Q8_0 blocks split by rows
and by whole blocks of K, the native whole step), P=2 and T=2 x P=2 (micro-batches in flight).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import model_factory
import numpy as np
import pytest
import torch
from test_native_decode_gemma import GEMMA3_NATIVE_SHAPES  # tests/ is on sys.path

from flashdecode import LLM, SamplingParams
from flashdecode.engine.parallel.pipeline import micro_batches
from flashdecode.engine.parallel.step import StepInputs
from flashdecode.errors import DistributedError, FlashDecodeError
from flashdecode.layers.attention import AttentionMetadata, PrefillSegment
from flashdecode.layers.quant import QuantizedTensor
from flashdecode.models.native_decode import NativeDecode

# 4 heads of 16 and an MLP of 256: o's 64 inputs and down's 256 split into whole 32-element blocks
SHAPE = dict(num_attention_heads=4, head_dim=16, intermediate_size=256)
PREFIX = [1, 17, 45, 300, 12, 99, 7, 250, 31, 8, 64, 140, 5, 77, 210, 3, 48]  # more than one KV block
PROMPTS = [PREFIX + [11, 23], [2, 9, 400, 41], PREFIX + [120, 6, 88, 19, 4], [33] * 9]
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, logprobs=3, ignore_eos=True)
# prompt logprobs need every prompt position computed: these requests skip the prefix cache
SCORED = SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, prompt_logprobs=2, ignore_eos=True)
ENGINE = dict(num_threads=1, kv_block_size=8, max_num_seqs=3, max_num_batched_tokens=16, numerics="exact")


@pytest.fixture(scope="module")
def reference() -> Callable[..., list[Any]]:
    """``reference(model, **options)``: ``_outputs`` of the single-process engine, run once a model."""
    made: dict[tuple[Path, str], list[Any]] = {}

    def get(model: Path, **options: Any) -> list[Any]:
        key = (model, repr(sorted(options.items())))
        if key not in made:
            made[key] = _outputs(LLM(str(model), **ENGINE, **options))
        return made[key]

    return get


def _outputs(llm: LLM) -> list[Any]:
    """Three rounds: the first fills the prefix cache, the second (the same prompts in another order)
    reuses it, the third scores the prompts."""
    return [llm.generate(PROMPTS, PARAMS), llm.generate(PROMPTS[::-1], PARAMS), llm.generate(PROMPTS, SCORED)]


def _assert_same(reference: list[Any], outputs: list[Any]) -> None:
    for ref, out in zip(sum(reference, []), sum(outputs, []), strict=True):
        r, o = ref.outputs[0], out.outputs[0]
        assert o.token_ids == r.token_ids
        scored = (ref.prompt_logprobs or [None])[1:], (out.prompt_logprobs or [None])[1:]
        assert len(scored[0]) == len(scored[1])
        for ref_lp, out_lp in zip(r.logprobs + scored[0], o.logprobs + scored[1], strict=True):
            assert ref_lp.keys() == out_lp.keys()
            for token, lp in ref_lp.items():
                assert abs(out_lp[token].logprob - lp.logprob) <= 1e-4


@pytest.fixture
def parallel_llm() -> Iterator[Callable[..., LLM]]:
    made: list[LLM] = []

    def make(model: Path, **options: Any) -> LLM:
        made.append(LLM(str(model), **ENGINE, **options))
        return made[-1]

    yield make
    for llm in made:
        llm.engine.shutdown()


@pytest.mark.parametrize(
    "source, kv_heads", [("hf", 1), ("gguf-Q8_0", 2)], ids=["hf-replicated-kv", "gguf-q8_0-split-kv"]
)
def test_tensor_parallel_matches_one_process(
    source: str,
    kv_heads: int,
    hf_model: Callable[..., Path],
    gguf_model: Callable[..., Path],
    reference: Callable[..., list[Any]],
    parallel_llm: Callable[..., LLM],
) -> None:
    shape = SHAPE | {"num_key_value_heads": kv_heads}
    model = hf_model("llama", **shape) if source == "hf" else gguf_model("llama", "Q8_0", **shape)
    expected = reference(model)
    llm = parallel_llm(model, tensor_parallel_size=2)
    outputs = _outputs(llm)
    _assert_same(expected, outputs)
    engine = llm.engine
    assert engine.stats().prefix_cache_hits > 0
    assert max(len(p) for p in PROMPTS) > ENGINE["max_num_batched_tokens"]  # prefills are chunked
    assert any(r.prompt_logprobs for r in expected[2])
    # rank 0 holds its shard only: half the heads, its KV heads, half the MLP and of the vocabulary
    layer = engine.model.layers[0]
    assert engine.cache.kv.shape[2] == max(1, kv_heads // 2)
    assert layer.qkv.out_features == (2 + 2 * max(1, kv_heads // 2)) * 16
    assert layer.o.in_features == 32 and layer.mlp.down.in_features == 128
    assert engine.model.lm_head.out_features == engine.spec.vocab_size // 2
    # the quantized shards run the native whole step (its all-reduces called back from C), the fp32
    # ones the Python layers (no native kernel for fp32 weights): both tensor-parallel paths are held
    assert bool(engine.model.native._steps) == (source != "hf")
    if source != "hf":
        assert layer.o.quantized and layer.o.format == "Q8_0"


@pytest.mark.parametrize(
    "arch, shape",
    [("llama", SHAPE | {"num_key_value_heads": 2}), ("gemma3", GEMMA3_NATIVE_SHAPES), ("qwen2moe", {})],
)
def test_native_step_reduces_where_the_python_layers_do(
    arch: str, shape: dict[str, Any], gguf_model: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One process, its native step and its Python layers handed the same stand-in all-reduce (a
    doubling: two ranks of equal partial sums), so that where it acts (before the residual add, before
    Gemma's post-norms, on the sum of Qwen2-MoE's experts and shared expert) shows: the same tokens
    and logprobs, two calls a layer on [T, hidden] rows. A failing all-reduce fails the step once it
    returns, after no further calls."""
    llm = LLM(str(gguf_model(arch, "Q8_0", **shape)), **ENGINE)
    model, sizes = llm.engine.model, []

    def use(all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for layer in model.layers:
            layer.reduce = all_reduce
        model.native.all_reduce = all_reduce
        model.native._steps.clear()  # the steps are rebuilt with it
        model.native._chosen.clear()
        sizes.clear()

    def double(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.numel())
        return x.mul_(2.0)

    use(double)
    native = llm.generate(PROMPTS, PARAMS)
    assert model.native._steps and sizes and len(sizes) % (2 * len(model.layers)) == 0
    assert all(n % model.spec.hidden_size == 0 for n in sizes)
    with monkeypatch.context() as m:
        m.setattr(NativeDecode, "step", lambda self, *args: None)
        _assert_same([llm.generate(PROMPTS, PARAMS)], [native])

    def failing(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.numel())
        raise DistributedError("parallel all-reduce failed (a rank died or stopped answering)")

    use(failing)
    with pytest.raises(DistributedError, match="a rank died"):
        llm.generate([PROMPTS[1]], PARAMS)
    assert len(sizes) == 1


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_1", "Q4_K", "Q6_K", "Q5_0"])
def test_input_shards_of_blocks_are_exact(fmt: str) -> None:
    """A split by input keeps whole 32-element blocks: each part dequantizes to gguf-py's values of
    those columns (K-quants and Q5_0 too, repacked into 32-element planes at load)."""
    n, k = 4, 512
    if fmt in ("Q4_K", "Q6_K"):
        raw = model_factory.random_k_blocks(fmt, n, k, seed=3)
    else:
        data = np.random.default_rng(3).standard_normal((n, k)).astype(np.float32)
        raw = gguf.quants.quantize(data, gguf.GGMLQuantizationType[fmt])
    reference = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[fmt]).reshape(n, k))
    w = QuantizedTensor.from_gguf_blocks(fmt, raw, (n, k))
    for first, end in ((0, 8), (8, 16), (3, 11)):
        part = w.columns(first, end)
        assert part.shape == (n, (end - first) * 32)
        assert torch.equal(part.dequantize(), reference[:, first * 32 : end * 32])


def test_sizes_that_do_not_divide_fail_clearly(hf_model: Callable[..., Path]) -> None:
    model = hf_model("llama", **SHAPE, num_key_value_heads=1)
    with pytest.raises(
        FlashDecodeError, match="tensor_parallel_size=3 does not divide the model's attention"
    ):
        LLM(str(model), tensor_parallel_size=3, num_threads=1)


# ngram speculation in one case: a drafting sequence's rows stay in one micro-batch
NGRAM = {"speculative": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1}}


@pytest.mark.parametrize(
    "source, tensor, options",
    [("hf", 1, {}), ("gguf-Q8_0", 1, NGRAM), ("hf", 2, {}), ("gguf-Q8_0", 2, {})],
    ids=["hf-p2", "gguf-q8_0-p2-ngram", "hf-t2xp2", "gguf-q8_0-t2xp2"],
)
def test_pipeline_parallel_matches_one_process(
    source: str,
    tensor: int,
    options: dict[str, Any],
    hf_model: Callable[..., Path],
    gguf_model: Callable[..., Path],
    reference: Callable[..., list[Any]],
    parallel_llm: Callable[..., LLM],
) -> None:
    """Three layers over two stages (two and one): each stage holds only its layers and their KV
    cache, rank 0 the embedding and no head; T x P splits each stage's layers over its two ranks. A
    step of several sequences runs as two micro-batches in flight."""
    shape = SHAPE | {"num_key_value_heads": 2, "num_hidden_layers": 3}
    model = hf_model("llama", **shape) if source == "hf" else gguf_model("llama", "Q8_0", **shape)
    expected = reference(model, **options)
    llm = parallel_llm(model, tensor_parallel_size=tensor, pipeline_parallel_size=2, **options)
    _assert_same(expected, _outputs(llm))
    engine = llm.engine
    assert engine.stats().prefix_cache_hits > 0
    assert len(engine.model.layers) == 2 and engine.cache.kv.shape[0] == 2
    assert engine.model.lm_head is None and engine.model.norm is None
    assert engine.model.layers[0].qkv.out_features == (4 + 2 * 2) * 16 // tensor
    counts = engine.runner.micro_batches
    assert counts.most == 2 and counts.steps < counts.micro_batches < 2 * counts.steps
    if options:
        assert engine.stats().spec_num_draft_tokens > engine.stats().spec_num_drafts > 0


def test_micro_batches_keep_sequences_whole() -> None:
    """A decode of three sequences (the second drafting two tokens) and a prompt chunk of five: over
    two stages the cut falls where the rows come nearest to halves, between whole sequences; each
    micro-batch's rows, metadata and logit rows are the step's own, numbered from its first row."""
    decode_lens, chunk = [5, 9, 10, 11, 3], 5
    slots = torch.arange(5 * 12).view(5, 12)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(100, 110), num_decode=5, decode_slots=slots,
        decode_context_lens=torch.tensor(decode_lens),
    )  # fmt: skip
    meta.prefills.append(PrefillSegment(5, chunk, 7, torch.arange(200, 207)))
    logit_rows = torch.tensor([0, 1, 2, 3, 4, 9, 6, 7])  # the samples, then two prompt-logprob rows
    step = StepInputs(torch.arange(10), torch.arange(10) * 2, meta, logit_rows, torch.tensor([1, 3, 1]))
    first, second = micro_batches(step, 4)[:2]
    assert len(micro_batches(step, 4)) == 4  # one micro-batch a sequence: there are four
    halves = micro_batches(step, 2)
    assert [mb.step.input_ids.tolist() for mb in halves] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert [mb.step.meta.num_decode for mb in halves] == [5, 0] and halves[1].step.meta.prefills[0].start == 0
    assert halves[0].step.meta.decode_context_lens.tolist() == decode_lens
    assert [mb.step.logit_rows.tolist() for mb in halves] == [[0, 1, 2, 3, 4], [4, 1, 2]]
    assert torch.equal(torch.cat([mb.out for mb in halves]), torch.arange(8))
    assert first.step.input_ids.tolist() == [0] and second.step.input_ids.tolist() == [1, 2, 3]
    assert torch.equal(second.step.meta.decode_slots, slots[1:4])
    assert torch.equal(second.step.meta.slot_mapping, torch.arange(101, 104))


def test_pipeline_sizes_that_do_not_fit_fail_clearly(hf_model: Callable[..., Path]) -> None:
    model = hf_model("llama", **SHAPE, num_key_value_heads=1, num_hidden_layers=2)
    with pytest.raises(FlashDecodeError, match="pipeline_parallel_size=3 exceeds the model's 2 layers"):
        LLM(str(model), pipeline_parallel_size=3, num_threads=1)
    with pytest.raises(FlashDecodeError, match="pipeline_parallel_size=0 must be a positive integer"):
        LLM(str(model), pipeline_parallel_size=0, num_threads=1)


@pytest.mark.parametrize("split", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_a_rank_that_dies_fails_the_engine(split: str, hf_model: Callable[..., Path]) -> None:
    llm = LLM(str(hf_model("llama", **SHAPE, num_key_value_heads=1)), **{split: 2}, **ENGINE)
    try:
        params = SamplingParams(max_tokens=2, temperature=0.0)
        assert len(llm.generate([PROMPTS[1]], params)[0].outputs[0].token_ids) == 2
        os.kill(llm.engine.ranks.workers.pids()[0], signal.SIGKILL)
        llm.engine.ranks.workers.processes[0].join(10)
        with pytest.raises(DistributedError, match="a rank died"):
            llm.generate([PROMPTS[1]], params)
        assert not llm.engine.has_unfinished_requests()  # the failed request was aborted, not left behind
    finally:
        llm.engine.shutdown()
