"""``flashdecode bench`` in its quick form: a tiny model, one thread, tiny shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flashdecode.cli import main
from flashdecode.errors import FlashDecodeError
from flashdecode.tools import bench, roofline
from flashdecode.tools.roofline import Ceilings
from flashdecode.utils.paths import cache_dir, write_json

CEILINGS = Ceilings(bandwidth=30e9, flops={"fp32": 2e11, "bf16": 7e11, "int8": 1.4e12}, threads=1)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("FLASHDECODE_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny_gguf(gguf_model) -> Path:
    return gguf_model("llama", "Q4_0")


def test_parse_int_list() -> None:
    assert bench.parse_int_list("1, 8,32", "--batch") == [1, 8, 32]
    assert bench.parse_int_list(4, "--gen-len") == [4]
    for bad in ("", "1,x", "0", "-2", "1.5"):
        with pytest.raises(FlashDecodeError, match="--batch"):
            bench.parse_int_list(bad, "--batch")
    with pytest.raises(FlashDecodeError, match="--gen-len"):
        bench.BenchConfig(gen_len=1)


def hand_decode_bound(
    gguf_path: Path, hf_dir: Path, batch: int, context: float, kv_itemsize: int = 4
) -> float:
    """tokens/s of one decode step of ``batch`` sequences attending to ``context`` positions each, by
    hand from the file's own tensor sizes (read with the ``gguf`` package) and the model's config:
    what roofline.py's docstring counts. fp32 compute (a Q4_0 GGUF), CEILINGS' int8 peak."""
    import gguf

    cfg = json.loads((hf_dir / "config.json").read_text())
    h, inter, vocab, layers = (
        cfg[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers")
    )
    heads, kv_heads, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    q, kv = heads * hd, kv_heads * hd
    tensors = {t.name: t for t in gguf.GGUFReader(gguf_path).tensors}
    assert "output.weight" in tensors  # untied head: read every step; the embedding is only gathered
    weights = sum(int(t.n_bytes) for name, t in tensors.items() if name != "token_embd.weight")
    embed_row = int(tensors["token_embd.weight"].n_bytes) / vocab
    kv_token = 2 * layers * kv * kv_itemsize  # K and V, every layer
    per_layer_acts = (h + q + 2 * kv) + (q + h) + (h + 2 * inter) + (inter + h)  # in + out of each projection
    acts = (layers * per_layer_acts + h) * 4 + vocab * 4  # the head writes fp32 logits
    nbytes = weights + batch * embed_row + batch * context * kv_token + batch * kv_token + batch * acts
    params = layers * (q * h + 2 * kv * h + h * q + 3 * inter * h) + vocab * h
    flops = 2 * batch * params + 4 * layers * heads * hd * batch * context
    return batch / max(nbytes / CEILINGS.bandwidth, flops / CEILINGS.flops["int8"])


def test_quick_bench_on_a_tiny_model(tiny_gguf: Path, hf_model) -> None:
    config = bench.BenchConfig(
        model=str(tiny_gguf), batches=[1, 2], prompt_lens=[8, 16], gen_len=4, reps=2, num_threads=1
    )
    result = bench.run_bench(config, progress=False, ceilings=CEILINGS)
    assert result["engine"]["threads"] == 1 and result["engine"]["dtype"] == "float32"
    assert result["compute"] == "int8"  # Q4_0 matrices
    assert result["engine"]["resident_weight_bytes"] > 0
    cells = {(c["batch"], c["prompt_len"]): c for c in result["cells"]}
    assert set(cells) == {(1, 8), (1, 16), (2, 8), (2, 16)}
    for (b, p), c in cells.items():
        assert c["reps"] == 2 and len(c["runs"]) == 2
        for run in c["runs"]:
            assert run["prefill_tokens"] == b * p
            # the first token of each request comes out of the prefill step, the rest from decode steps
            assert run["decode_tokens"] == b * 3
            assert all(n == b for n, _ in run["decode_steps"])
            assert len(run["ttft_s"]) == b and all(t > 0 for t in run["ttft_s"])
        # the figures are the raw timings' arithmetic: tokens / seconds, medians over the two runs
        rates = sorted(run["decode_tokens"] / run["decode_s"] for run in c["runs"])
        assert c["decode_tok_s"]["min"] == pytest.approx(rates[0])
        assert c["decode_tok_s"]["max"] == pytest.approx(rates[1])
        assert c["decode_tok_s"]["median"] == pytest.approx((rates[0] + rates[1]) / 2)
        prefill = sorted(run["prefill_tokens"] / run["prefill_s"] for run in c["runs"])
        assert c["prefill_tok_s"]["median"] == pytest.approx((prefill[0] + prefill[1]) / 2)
        # the decode bound at the cell's mean context: the decode steps read the K/V of p + 1, ...,
        # p + gen_len - 1 positions (each step's input token included), on average p + gen_len / 2
        kv_itemsize = 4 if result["engine"]["kv_cache_dtype"] == "float32" else 2  # per --numerics
        want = hand_decode_bound(tiny_gguf, hf_model("llama"), b, p + 4 / 2, kv_itemsize)
        assert c["decode_bound_tok_s"] == pytest.approx(want, rel=1e-9)
        assert c["decode_fraction"] == pytest.approx(c["decode_tok_s"]["median"] / want, rel=1e-9)
        assert 0 < c["decode_fraction"] < 1 and 0 < c["prefill_fraction"] < 1
    table = bench.format_bench_table(result)
    assert "decode tok/s" in table and "% of" in table
    # peak RSS beside the file and the KV cache: 2 sequences of at most 16 + 4 + 1 = 21 tokens, two
    # blocks of 16 slots each, every slot 2 (K, V) x layers x KV heads x head_dim elements
    cfg = json.loads((hf_model("llama") / "config.json").read_text())
    slot = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * kv_itemsize
    mem = result["memory"]
    assert mem["model_file_bytes"] == tiny_gguf.stat().st_size
    assert mem["kv_cache_bytes"] == 2 * 2 * 16 * slot
    assert mem["peak_rss_from"] == "engine load" and mem["peak_rss_bytes"] > 0
    total = mem["model_file_bytes"] + mem["kv_cache_bytes"]
    assert mem["peak_rss_ratio"] == pytest.approx(mem["peak_rss_bytes"] / total)
    # the part of the peak above the RSS the process had before the engine (interpreter, torch)
    assert 0 < mem["baseline_rss_bytes"] <= mem["peak_rss_bytes"]
    over = mem["peak_rss_bytes"] - mem["baseline_rss_bytes"]
    assert mem["peak_rss_over_baseline_bytes"] == over
    assert mem["peak_rss_over_baseline_ratio"] == pytest.approx(over / total)
    assert "above the" in bench.describe_result(result)
    json.dumps(result)  # JSON-able as it is


def test_bench_command_writes_json(tiny_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    key = roofline._cache_key(1)
    entry = {"bandwidth": 30e9, "flops": {"fp32": 2e11, "bf16": 7e11, "int8": 1.4e12}, "measured_at": "t"}
    write_json(cache_dir() / roofline.CACHE_FILE, {"version": roofline.CACHE_VERSION, key: entry})
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", str(tiny_gguf), "--batch", "1,2", "--prompt-len", "8", "--gen-len", "3"]
    assert main([*argv, "--threads", "1", "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "prefill tok/s" in printed and "memory bandwidth" in printed and "ITL ms" in printed
    result = json.loads(out.read_text())
    assert [(c["batch"], c["prompt_len"], c["gen_len"]) for c in result["cells"]] == [(1, 8, 3), (2, 8, 3)]
    assert result["ceilings"]["bandwidth_fresh"] is True  # bandwidth measured in the bench's process


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch", "0"], "--batch"),
        (["--prompt-len", "a"], "--prompt-len"),
        (["--gen-len", "1"], "--gen-len"),
        (["--reps", "0"], "--reps"),
        (["--model", "/nonexistent.gguf"], "does not exist"),
    ],
)
def test_bench_bad_input_is_one_line(argv, message, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--no-progress", "--threads", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_resident_tensor_bytes_counts_each_storage_once() -> None:
    import torch

    class Holder:
        def __init__(self) -> None:
            self.a = torch.zeros(10, dtype=torch.float32)
            self.view = self.a[:5]  # same storage
            self.items = [torch.zeros(4, dtype=torch.int8), {"b": torch.zeros(2, dtype=torch.bfloat16)}]

    assert bench.resident_tensor_bytes(Holder()) == 40 + 4 + 4
