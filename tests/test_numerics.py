"""numerics="auto" / "exact" (engine/numerics.py): the held-out check behind int8 activations and a
16-bit KV cache, where its records come from, and what each mode sets."""

from __future__ import annotations

import pytest

from flashdecode import LLM
from flashdecode.cli import build_parser
from flashdecode.engine import numerics
from flashdecode.layers.dataflow import is_approx
from flashdecode.layers.linear import iter_linears


def kernels(llm: LLM) -> set[str]:
    return {name for lin in iter_linears(llm.engine.model.linears()) for _, name in lin.plan}


def no_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("measured although a record exists")

    monkeypatch.setattr(numerics, "measure", fail)


def test_embedded_model_default_is_int8_activations_from_its_shipped_record(native_kernels, monkeypatch):
    if not native_kernels.has_q8:
        pytest.skip(f"{native_kernels.isa} build: no int8-activation kernel")
    no_measuring(monkeypatch)  # the record ships in flashdecode/data/numerics.json
    llm = LLM(max_model_len=128)
    chosen = llm.engine.numerics
    assert chosen.int8_activations and chosen.record["allowed"]
    assert chosen.record["int8_activations_16bit_kv"] <= chosen.record["exact"] * (1 + numerics.PPL_TOLERANCE)
    assert (
        llm.engine.cache.kv.dtype.itemsize == 2 and chosen.kv_cache_dtype == chosen.record["kv_cache_dtype"]
    )
    # every projection of the embedded model (Q4_1, Q8_0) has the rows-interleaved int8 kernel
    assert kernels(llm) == {"native_i8" if native_kernels.has_i8 else "native_q8"}


def test_exact_keeps_stored_weights_and_fp32_kv(native_kernels) -> None:
    llm = LLM(max_model_len=128, numerics="exact")
    assert not llm.engine.numerics.int8_activations
    assert llm.engine.cache.kv.dtype == llm.engine.dtype
    assert not any(is_approx(name) for name in kernels(llm))
    out = llm.generate("The capital of France is")[0].outputs[0].text
    assert out


def test_a_model_is_checked_once_and_the_record_reused(gguf_model, native_kernels, monkeypatch) -> None:
    if not native_kernels.has_q8:
        pytest.skip(f"{native_kernels.isa} build: no int8-activation kernel")
    path = str(gguf_model("llama", "Q8_0"))
    calls = []
    real = numerics.measure

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(numerics, "measure", counted)
    first = LLM(model=path, max_model_len=256).engine.numerics
    assert len(calls) == 1 and first.record["tokens"] > 100
    assert first.int8_activations == first.record["allowed"]
    second = LLM(model=path, max_model_len=256).engine.numerics
    assert len(calls) == 1 and second.record == first.record


def test_a_failed_check_stays_exact(gguf_model, native_kernels, monkeypatch) -> None:
    if not native_kernels.has_q8:
        pytest.skip(f"{native_kernels.isa} build: no int8-activation kernel")
    monkeypatch.setattr(numerics, "PPL_TOLERANCE", -1.0)  # nothing can pass
    llm = LLM(model=str(gguf_model("qwen2", "Q4_0")), max_model_len=256)
    assert llm.engine.numerics.record["allowed"] is False
    assert not llm.engine.numerics.int8_activations and not kernels(llm) & {"native_q8", "native_i8"}
    assert llm.engine.cache.kv.dtype == llm.engine.dtype


def test_float_checkpoints_are_exact_without_a_check(hf_model, monkeypatch) -> None:
    no_measuring(monkeypatch)
    llm = LLM(model=str(hf_model("llama")), max_model_len=128)
    assert llm.engine.numerics.record is None and not llm.engine.numerics.int8_activations


def test_cli_flags() -> None:
    args = build_parser().parse_args(["generate", "hi", "--exact", "--kv-cache-dtype", "f16"])
    assert args.numerics == "exact" and args.kv_cache_dtype == "f16"
    assert build_parser().parse_args(["generate", "hi"]).numerics == "auto"
