"""The roofline model: bytes and FLOPs per step checked by hand on known shapes, the ceilings'
measurement and cache, and ``flashdecode roofline``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flashdecode.cli import main
from flashdecode.errors import FlashDecodeError
from flashdecode.models.spec import FAMILIES, ModelSpec
from flashdecode.tools import probe, roofline
from flashdecode.tools.roofline import (
    Ceilings,
    CommCost,
    Link,
    ModelCost,
    bytes_per_weight,
    parallel_decode_step,
)
from flashdecode.utils.paths import cache_dir, write_json


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("FLASHDECODE_CACHE_DIR", str(cache))
    return cache


def small_spec(**changes) -> ModelSpec:
    base = dict(
        family=FAMILIES["llama"],
        vocab_size=100,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        norm_eps=1e-5,
        rope_theta=10000.0,
        max_position=256,
        tie_embeddings=False,
    )
    base.update(changes)
    return ModelSpec(**base)


def tinyllama_spec() -> ModelSpec:
    """The 1.1B Llama shape the peer benchmark uses (TinyLlama's)."""
    return small_spec(
        vocab_size=32000,
        hidden_size=2048,
        num_layers=22,
        num_heads=32,
        num_kv_heads=4,
        head_dim=64,
        intermediate_size=5632,
        max_position=2048,
    )


# --- stored formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, expected",
    [
        ("Q4_1", 20 / 32),
        ("Q8_0", 34 / 32),
        ("Q4_0", 18 / 32),
        ("Q4_K", 144 / 256),
        ("Q6_K", 210 / 256),
        ("F16", 2),
        ("BF16", 2),
        ("F32", 4),
        ("bfloat16", 2),
        ("float32", 4),
        ("torch.float16", 2),
    ],
)
def test_bytes_per_weight(fmt: str, expected: float) -> None:
    assert bytes_per_weight(fmt) == expected


def test_bytes_per_weight_falls_back_to_gguf_and_rejects_unknown() -> None:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType.IQ2_XXS]
    assert bytes_per_weight("IQ2_XXS") == size / block
    with pytest.raises(FlashDecodeError, match="unknown weight storage format"):
        bytes_per_weight("Q3_FANCY")


# --- bytes and FLOPs by hand -------------------------------------------------------------------------
# small_spec: hidden 64, 2 layers, 4 heads of 16, 2 KV heads (kv size 32), intermediate 128, vocab 100.
#   per layer: q 64*64 = 4096, k 32*64 = 2048, v 2048, o 4096, gate/up/down 128*64 = 8192 each
#              -> 36864 multiply-adds; 2 layers -> 73728; head 100*64 = 6400; all: 80128
#   vectors: attn_norm + mlp_norm 2*64 per layer -> 256, final norm 64 -> 320
#   all F32: weights (80128 + 320) * 4 = 321792 bytes; one embedding row 64 * 4 = 256
#   KV cache (fp32): 2 (K, V) * 2 layers * 32 * 4 = 512 bytes per token
#   activations per token per layer, elements: qkv 64 in + 128 out, o 64 + 64, gate/up 64 + 256,
#   down 128 + 64 -> 832; 2 layers -> 1664 -> 6656 bytes; head 64 in * 4 + 100 fp32 logits * 4 = 656
#   attention FLOPs per attended position: 4 * 2 layers * 4 heads * 16 = 512


def test_weight_shapes_and_bytes_by_hand() -> None:
    cost = ModelCost(small_spec())
    assert cost.matmul_params() == 80128
    assert cost.matmul_params(head=False) == 73728
    assert sum(cost.vector_sizes().values()) == 320
    assert cost.resident_weight_bytes() == 321792
    assert cost.embedding_row_bytes() == 256
    assert cost.kv_bytes_per_token == 512
    assert cost.activation_bytes_per_token() == 6656 + 656
    assert cost.activation_bytes_per_token(head=False) == 6656


def test_decode_step_batch_1_by_hand() -> None:
    step = ModelCost(small_spec()).decode_step(batch=1, context=10)
    assert step.tokens == 1
    assert step.flops == 2 * 80128 + 512 * 10 == 165376
    assert step.weight_bytes == 321792 + 256
    assert step.kv_read_bytes == 10 * 512
    assert step.kv_write_bytes == 512
    assert step.activation_bytes == 7312
    assert step.bytes == 321792 + 256 + 5120 + 512 + 7312 == 334992
    assert step.intensity == pytest.approx(165376 / 334992)


def test_decode_step_batch_8_shares_the_weights() -> None:
    step = ModelCost(small_spec()).decode_step(batch=8, context=10)
    assert step.tokens == 8
    assert step.flops == 8 * 2 * 80128 + 8 * 512 * 10 == 1323008
    assert step.weight_bytes == 321792 + 8 * 256  # the matrices once, an embedding row per sequence
    assert step.kv_read_bytes == 8 * 10 * 512  # but every sequence reads its own KV cache
    assert step.kv_write_bytes == 8 * 512
    assert step.activation_bytes == 8 * 7312
    per_seq_contexts = ModelCost(small_spec()).decode_step(batch=2, context=[5, 15])
    assert per_seq_contexts.kv_read_bytes == 20 * 512
    assert per_seq_contexts.flops == 2 * 2 * 80128 + 512 * 20


def test_kv_reads_grow_with_context_and_shrink_with_gqa() -> None:
    cost = ModelCost(small_spec())
    short, long = cost.decode_step(1, 10), cost.decode_step(1, 110)
    assert long.kv_read_bytes - short.kv_read_bytes == 100 * 512
    assert long.weight_bytes == short.weight_bytes
    assert long.flops - short.flops == 100 * 512  # attention FLOPs count query heads
    # as many KV heads as query heads (no GQA): twice the KV bytes, same attention FLOPs
    mha = ModelCost(small_spec(num_kv_heads=4))
    assert mha.kv_bytes_per_token == 2 * 2 * 64 * 4 == 1024
    assert mha.decode_step(1, 10).kv_read_bytes == 2 * short.kv_read_bytes
    assert mha.attention_flops(10) == cost.attention_flops(10)


def test_prefill_by_hand() -> None:
    step = ModelCost(small_spec()).prefill(prompt_len=10)
    # projections for 10 tokens, the head for the last one only, causal attention over 1+2+...+10 = 55
    assert step.flops == 2 * 10 * 73728 + 2 * 6400 + 512 * 55 == 1515520
    assert step.weight_bytes == 321792 + 10 * 256
    assert step.kv_read_bytes == step.kv_write_bytes == 10 * 512
    assert step.activation_bytes == 10 * 6656 + 656
    two = ModelCost(small_spec()).prefill(prompt_len=10, batch=2)
    assert two.tokens == 20
    assert two.flops == 2 * step.flops
    assert two.weight_bytes == 321792 + 20 * 256  # the weights once for both prompts
    per_token = step.per_token()
    assert per_token["flops"] == 151552
    with pytest.raises(FlashDecodeError):
        ModelCost(small_spec()).prefill(0)


def test_stored_formats_tied_head_and_bf16_cache() -> None:
    spec = small_spec(tie_embeddings=True)
    formats = {"embed": "Q8_0"}
    for i in range(2):
        formats |= {f"layers.{i}.{m}": "Q4_1" for m in ("q", "k", "v", "o", "gate", "up", "down")}
    formats |= {"rope_freqs": "F32"}  # formats may name tensors the cost model does not read
    cost = ModelCost(spec, formats, activation_bytes=2, kv_bytes_per_token=2 * 2 * 32 * 2)
    # layers Q4_1: 73728 * 20 / 32 = 46080; the tied head reads the Q8_0 embedding: 6400 * 34 / 32 = 6800;
    # norms not listed -> default F32: 320 * 4 = 1280
    assert cost.resident_weight_bytes() == 46080 + 6800 + 1280
    assert cost.embedding_row_bytes() == 64 * 34 / 32
    assert cost.format_of("lm_head") == "Q8_0"
    assert cost.compute_dtype() == "int8"
    assert cost.decode_step(1, 10).kv_read_bytes == 10 * 256
    assert cost.stored_format_summary() == "Q4_1 x14, Q8_0 x1"
    assert (
        ModelCost(spec, {"embed": "bfloat16"} | dict.fromkeys(formats, "bfloat16")).compute_dtype() == "bf16"
    )
    assert ModelCost(spec).compute_dtype() == "fp32"


def test_tinyllama_1b_q4_0_by_hand() -> None:
    spec = tinyllama_spec()
    assert spec.num_parameters() == 1_100_048_384  # TinyLlama-1.1B's published count
    formats = {"embed": "Q4_0", "lm_head": "Q6_K"}
    for i in range(22):
        formats |= {f"layers.{i}.{m}": "Q4_0" for m in ("q", "k", "v", "o", "gate", "up", "down")}
    cost = ModelCost(spec, formats, activation_bytes=4, kv_bytes_per_token=2 * 22 * 256 * 2)
    # per layer 2 * 2048^2 + 2 * 256 * 2048 + 3 * 5632 * 2048 = 44,040,192; * 22 = 968,884,224
    assert cost.matmul_params(head=False) == 968_884_224
    # Q4_0 layers 968884224 * 18 / 32 = 544,997,376; Q6_K head 65,536,000 * 210 / 256 = 53,760,000;
    # F32 norms (22 * 2 + 1) * 2048 * 4 = 368,640
    assert cost.resident_weight_bytes() == 544_997_376 + 53_760_000 + 368_640
    step = cost.decode_step(1, 512)
    assert step.kv_read_bytes == 512 * 22528  # bf16 KV: 2 * 22 layers * 4 heads * 64 * 2 bytes
    assert step.flops == 2 * (968_884_224 + 65_536_000) + 4 * 22 * 32 * 64 * 512
    ceilings = Ceilings(bandwidth=30e9, flops={"fp32": 2e11, "bf16": 7e11, "int8": 1.4e12}, threads=2)
    assert step.limit(ceilings, "int8") == "memory"
    assert step.tokens_per_s(ceilings, "int8") == pytest.approx(30e9 / step.bytes)
    assert 45 < step.tokens_per_s(ceilings, "int8") < 50  # ~0.61 GB per token at 30 GB/s
    prefill = cost.prefill(512)
    assert prefill.limit(ceilings, "int8") == "compute"
    assert prefill.tokens_per_s(ceilings, "int8") == pytest.approx(512 / (prefill.flops / 1.4e12))


# --- beyond one machine: small_spec over T ranks (F32) -----------------------------------------------
# T=2: each rank holds 2 of 4 heads, 1 of 2 KV heads, 64 of 128 MLP columns, 50 of 100 vocab rows:
#   per layer q 32x64 + k 16x64 + v 16x64 + o 64x32 + gate/up/down 3 x 64x64 = 18432 weights; 2 layers
#   -> 36864 * 4 = 147456 bytes; head 50x64 * 4 = 12800; norms replicated 320 * 4 = 1280; one
#   embedding row 256 -> 161792; KV 2 layers x 1 head x 16 x 2 (K, V) x 4 = 256 bytes per token
#   messages: the hidden states (64 * 4 = 256 bytes a token) all-reduced after the embedding and
#   after o and down of 2 layers (5 all-reduces, a ring of 2: 2 messages, 2 * 1/2 * 256 = 256 bytes
#   each), the fp32 logits (100 * 4 a token) gathered (1 message, 1/2 * 400 = 200 bytes)


def test_tensor_parallel_step_by_hand() -> None:
    one = parallel_decode_step(ModelCost(small_spec()), batch=1, context=10, tensor_parallel=2)
    assert one.stage.weight_bytes == 161792
    assert one.stage.kv_read_bytes == 10 * 256 and one.stage.kv_write_bytes == 256
    assert one.tp_comm == CommCost(messages=10 + 1, bytes=5 * 256 + 200) and one.pp_comm == CommCost()
    assert one.stage == one.shard and one.stage_tp_comm == one.tp_comm
    eight = parallel_decode_step(ModelCost(small_spec()), batch=8, context=10, tensor_parallel=2)
    assert eight.stage.weight_bytes == 161792 - 256 + 8 * 256  # the shards once, a row per sequence
    assert eight.tp_comm == CommCost(messages=11, bytes=8 * (5 * 256 + 200))  # bytes grow, messages not
    link = Link(bandwidth=1e9, latency=1e-5)
    ceilings = Ceilings(bandwidth=30e9, flops={"fp32": 2e11}, threads=1)
    assert one.comm_time(link) == pytest.approx(11 * 1e-5 + 1480 / 1e9)
    assert one.step_time(ceilings, link, "fp32") == pytest.approx(one.stage.bytes / 30e9 + 11e-5 + 1480e-9)


def test_tensor_parallel_past_the_kv_heads_and_a_ring_of_four() -> None:
    """T=4 over 2 KV heads: each rank holds 1 head of q and a replica of 1 KV head, so the KV bytes
    per rank halve, not quarter; a ring of 4 all-reduces in 6 messages of 1/4 of the payload."""
    step = parallel_decode_step(ModelCost(small_spec()), batch=1, context=10, tensor_parallel=4)
    assert step.stage.kv_write_bytes == 256
    # per layer q 16x64 + k 16x64 + v 16x64 + o 64x16 + 3 x 64x32 = 10240 weights; head 25x64
    assert step.stage.weight_bytes == (2 * 10240 + 25 * 64 + 320 + 64) * 4
    assert step.tp_comm == CommCost(messages=5 * 6 + 3, bytes=5 * 1.5 * 256 + 3 / 4 * 400)


def test_pipeline_parallel_step_by_hand() -> None:
    """P=2: the last stage holds 1 layer (36864 weights), its norms (128), the final norm (64), the
    head (6400) and one embedding row; its boundary sends one token's hidden states (256 bytes), and
    the last stage sends its logits (400 bytes) to rank 0. One step runs both stages in turn: the whole
    model's bytes, and the two sends."""
    step = parallel_decode_step(ModelCost(small_spec()), batch=1, context=10, pipeline_parallel=2)
    assert step.stage.weight_bytes == (36864 + 192 + 6400) * 4 + 256
    assert step.shard == ModelCost(small_spec()).decode_step(1, 10)
    assert step.tp_comm == step.stage_tp_comm == CommCost() and step.pp_comm == CommCost(1, 256)
    assert step.logits_comm == step.comm == CommCost(1, 400)
    link = Link(bandwidth=1e9, latency=1e-5)
    ceilings = Ceilings(bandwidth=30e9, flops={"fp32": 2e11}, threads=1)
    sends = 2e-5 + 656e-9
    assert step.step_time(ceilings, link, "fp32") == pytest.approx(334992 / 30e9 + sends)
    stage = step.stage.bytes / 30e9
    assert step.pipelined_tokens_per_s(ceilings, link, "fp32") == pytest.approx(1 / (stage + sends))
    both = parallel_decode_step(ModelCost(small_spec()), 1, 10, tensor_parallel=2, pipeline_parallel=2)
    # the last stage: 2 all-reduces of its 1 layer and the logits' gather (the embedding's is the
    # first stage's); a step: the embedding's and 2 layers' all-reduces and the gather
    assert both.stage_tp_comm == CommCost(2 * 2 + 1, 2 * 256 + 200) and both.pp_comm == CommCost(1, 256)
    assert both.tp_comm == CommCost(5 * 2 + 1, 5 * 256 + 200)
    assert both.comm_time(link) == pytest.approx(11e-5 + 1480e-9 + sends)


def test_pipeline_micro_batches_each_send() -> None:
    """Four sequences over P=2 cross the boundary as two micro-batches (the engine's cut): two
    messages, the same bytes as one; over P=4 each of them is its own micro-batch."""
    two = parallel_decode_step(ModelCost(small_spec(num_layers=4)), batch=4, context=10, pipeline_parallel=2)
    assert two.pp_comm == CommCost(2, 4 * 256) and two.logits_comm == CommCost(2, 4 * 400)
    four = parallel_decode_step(ModelCost(small_spec(num_layers=4)), batch=4, context=10, pipeline_parallel=4)
    assert four.pp_comm == CommCost(4, 4 * 256)
    link = Link(bandwidth=1e9, latency=1e-5)
    assert four.comm_time(link) == pytest.approx(3 * (4e-5 + 1024e-9) + 4e-5 + 1600e-9)


def test_tensor_parallel_beats_one_rank_only_on_a_fast_link() -> None:
    """The weights per rank halve, the messages do not: at one token a step TinyLlama's bf16 decode
    gains from a second rank over a link of microseconds and loses over one of milliseconds."""
    cost = ModelCost(tinyllama_spec(), default_format="BF16", activation_bytes=2)
    ceilings = Ceilings(bandwidth=30e9, flops={"fp32": 2e11, "bf16": 7e11}, threads=1)
    one = cost.decode_step(1, 512).tokens_per_s(ceilings, "bf16")
    step = parallel_decode_step(cost, 1, 512, tensor_parallel=2)
    assert step.tokens_per_s(ceilings, Link.from_gbit(100, 2), "bf16") > one
    assert step.tokens_per_s(ceilings, Link.from_gbit(100, 1000), "bf16") < one


def test_time_bound_is_the_slower_of_memory_and_compute() -> None:
    step = roofline.StepCost(tokens=4, flops=8e9, weight_bytes=1e9, kv_read_bytes=0, kv_write_bytes=0,
                             activation_bytes=0)  # fmt: skip
    c = Ceilings(bandwidth=10e9, flops={"fp32": 1e11, "int8": 0.0}, threads=1)
    assert step.memory_time(c) == pytest.approx(0.1)
    assert step.compute_time(c, "fp32") == pytest.approx(0.08)
    assert step.time_bound(c, "fp32") == pytest.approx(0.1)
    assert step.tokens_per_s(c, "fp32") == pytest.approx(40)
    assert step.limit(c, "fp32") == "memory"
    # no int8 kernel (or a slow one): quantized weights can still be dequantized to fp32 FMAs
    assert step.compute_time(c, "int8") == pytest.approx(0.08)
    slow_int8 = Ceilings(bandwidth=10e9, flops={"fp32": 1e11, "int8": 2e9}, threads=1)
    assert step.compute_time(slow_int8, "int8") == pytest.approx(0.08)
    with pytest.raises(FlashDecodeError, match="no measured matmul throughput"):
        step.time_bound(Ceilings(bandwidth=10e9, flops={"fp32": 0.0, "int8": 0.0}, threads=1), "int8")


def test_model_cost_of_a_loaded_quantized_gguf(gguf_model) -> None:
    """Formats as the real loader reports them, on a Q4_0 GGUF of known shape."""
    from flashdecode.models.loader import load_model

    path = gguf_model("llama", "Q4_0")
    loaded = load_model(path)
    cost = ModelCost(loaded.spec, loaded.formats)
    s = loaded.spec  # hidden 96, 2 layers, 6 heads of 16, 2 KV heads, intermediate 288, vocab 512
    layer = 96 * 96 * 2 + 2 * 32 * 96 + 3 * 288 * 96
    assert cost.matmul_params(head=False) == 2 * layer
    expected = sum(
        t.numel() * bytes_per_weight(loaded.formats[name])
        for name, t in loaded.weights.items()
        if name != "embed"
    )
    assert cost.resident_weight_bytes() == pytest.approx(expected)
    assert s.num_kv_heads == 2
    spec, formats, _ = roofline.describe_model(str(path))  # the metadata-only path agrees
    assert spec == loaded.spec
    assert ModelCost(spec, formats).resident_weight_bytes() == cost.resident_weight_bytes()


# --- the machine -------------------------------------------------------------------------------------


def test_measurements_are_positive_and_quick() -> None:
    assert probe.measure_memory_bandwidth(1, nbytes=8 << 20, min_time=0.02) > 1e8
    assert probe.measure_matmul_flops("fp32", 1, sizes=(64,), min_time=0.02) > 1e7
    int8 = probe.measure_matmul_flops("int8", 1, sizes=(64,), min_time=0.02)
    a = torch.randint(-8, 8, (64, 64), dtype=torch.int8)
    try:  # does this torch build have the int8 x int8 -> int32 kernel the probe times?
        torch._int_mm(a, a)
        supported = True
    except (RuntimeError, NotImplementedError):
        supported = False
    if supported:
        assert int8 > 1e7  # a 64^3 product takes well under 50 ms anywhere
    else:
        assert int8 == 0.0  # documented: 0.0 when there is no kernel for the dtype
    with pytest.raises(ValueError):
        probe.measure_matmul_flops("fp8")


def test_ceilings_are_cached_in_the_cache_dir(_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"bw": 0, "mm": 0}

    def fake_bw(threads, *a, **k):
        calls["bw"] += 1
        return 20e9 + calls["bw"] * 10e9

    def fake_mm(dtype, threads, *a, **k):
        calls["mm"] += 1
        return {"fp32": 1e11, "bf16": 5e11, "int8": 1e12}[dtype]

    monkeypatch.setattr(probe, "measure_memory_bandwidth", fake_bw)
    monkeypatch.setattr(probe, "measure_matmul_flops", fake_mm)
    first = roofline.machine_ceilings(2)
    assert (first.bandwidth, first.flops["bf16"], first.threads) == (30e9, 5e11, 2)
    assert first.bandwidth_fresh
    data = json.loads((_cache_dir / roofline.CACHE_FILE).read_text())
    assert data["version"] == roofline.CACHE_VERSION
    again = roofline.machine_ceilings(2)
    assert calls == {"bw": 1, "mm": 3} and not again.bandwidth_fresh and again.bandwidth == 30e9
    fresh = roofline.machine_ceilings(2, fresh_bandwidth=True)  # measured now: 40e9, and cached as the best
    assert fresh.bandwidth == 40e9 and fresh.bandwidth_fresh and calls["mm"] == 3
    assert roofline.machine_ceilings(2).bandwidth == 40e9
    roofline.machine_ceilings(2, refresh=True)
    assert calls == {"bw": 3, "mm": 6}
    roofline.machine_ceilings(1)  # another thread count is another entry
    assert calls["mm"] == 9


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FLASHDECODE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "flashdecode"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "flashdecode"


# --- the command -------------------------------------------------------------------------------------


def _seed_cache() -> None:
    """Cached ceilings for 1 thread, so the command measures nothing."""
    key = roofline._cache_key(1)
    entry = {"bandwidth": 30e9, "flops": {"fp32": 2e11, "bf16": 7e11, "int8": 1.4e12}, "measured_at": "t"}
    write_json(cache_dir() / roofline.CACHE_FILE, {"version": roofline.CACHE_VERSION, key: entry})


def test_roofline_command(gguf_model, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    _seed_cache()
    path = gguf_model("llama", "Q4_0")
    out_json, png = tmp_path / "r.json", tmp_path / "roofline.png"
    bench_json = tmp_path / "bench.json"
    cell = {"batch": 1, "prompt_len": 8, "gen_len": 4, "decode_tok_s": {"median": 50.0}}
    bench_json.write_text(json.dumps({"cells": [cell | {"prefill_tok_s": {"median": 400.0}}]}))
    argv = ["roofline", "--model", str(path), "--threads", "1", "--batch", "1,8", "--context", "64"]
    argv += ["--prompt-len", "16,32", "--json", str(out_json), "--plot", str(png), "--bench", str(bench_json)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "30.0 GB/s" in out and "decode, each sequence at context 64" in out and "prefill" in out
    report = json.loads(out_json.read_text())
    assert [r["batch"] for r in report["decode"]] == [1, 8]
    assert report["compute"] == "int8"
    assert report["decode"][0]["tokens_per_s"] == pytest.approx(30e9 / report["decode"][0]["bytes"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_roofline_command_predicts_tensor_parallel(gguf_model, tmp_path: Path, capsys) -> None:
    _seed_cache()
    out_json = tmp_path / "r.json"
    argv = ["roofline", "--model", str(gguf_model("llama", "Q4_0")), "--threads", "1", "--batch", "1,8"]
    argv += ["--tensor-parallel-size", "2", "--link-gbit", "8", "--link-latency-us", "100"]
    assert main([*argv, "--json", str(out_json)]) == 0
    assert "decode over 2 x 1 ranks" in capsys.readouterr().out
    report = json.loads(out_json.read_text())
    parallel = report["parallel"]
    assert parallel["link_bytes_per_s"] == 1e9 and parallel["link_latency_s"] == pytest.approx(1e-4)
    for one, r in zip(report["decode"], parallel["decode"], strict=True):
        assert r["one_rank_tokens_per_s"] == one["tokens_per_s"]
        # memory-bound ranks: a step is its shard's bytes at 30 GB/s and its messages on the link
        comm = r["messages_per_rank"] * 1e-4 + r["comm_bytes_per_rank"] / 1e9
        assert r["step_s"] == pytest.approx(r["bytes_per_rank"] / 30e9 + comm)
        assert r["tokens_per_s"] == pytest.approx(one["batch"] / r["step_s"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch", "1,x"], "--batch"),
        (["--batch", "0"], "--batch"),
        (["--context", "0"], "--context"),
        (["--compute", "fp8"], "--compute"),
        (["--kv-dtype", "fp8"], "--kv-dtype"),
        (["--model", "/nonexistent/model.gguf"], "does not exist"),
        (["--bench", "/nonexistent/bench.json"], "--bench"),
        (["--tensor-parallel-size", "0"], "--tensor-parallel-size"),
        (["--tensor-parallel-size", "2"], "attention heads (9)"),
        (["--pipeline-parallel-size", "7"], "layers"),
        (["--tensor-parallel-size", "3", "--link-gbit", "0"], "Gbit/s"),
    ],
)
def test_roofline_bad_input_is_one_line(argv, message, capsys: pytest.CaptureFixture) -> None:
    _seed_cache()
    assert main(["roofline", "--threads", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize(
    ("kv_dtype", "per_head"), [("auto", 2 * 16 * 4), ("bf16", 2 * 16 * 2), ("int8", 2 * (16 + 4))]
)
def test_kv_bytes_per_token_of_the_real_cache(kv_dtype: str, per_head: int) -> None:
    """What the roofline charges per cached token is what the engine's KV cache holds: K and V of
    every layer and kv head (int8: values and one fp32 scale each), counted by hand."""
    import torch

    from flashdecode.layers.kv_cache import KVCache

    cache = KVCache(3, 10, 2, 16, torch.float32, kv_dtype)
    assert cache.bytes_per_slot == 3 * 2 * per_head
    assert cache.bytes_per_slot == KVCache.bytes_per_token(3, 2, 16, torch.float32, kv_dtype)
    slots = cache.kv.shape[1]
    held = cache.kv.numel() * cache.kv.element_size()
    held += cache.kv_scale.numel() * cache.kv_scale.element_size() if kv_dtype == "int8" else 0
    assert held == slots * cache.bytes_per_slot
