"""Calibration of the unified max value (tools/calibrate.py, engine/calibration.py) and its CLI."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from flashdecode import LLM, FlashDecodeError, SamplingParams
from flashdecode.cli import main
from flashdecode.engine import calibration as K
from flashdecode.layers.attention import WINDOW_FP16
from flashdecode.tools import calibrate as C


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never touch the real ~/.cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FLASHDECODE_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny_model(gguf_model) -> Path:
    return gguf_model("llama")


def short(name: str, chars: int = 1200) -> str:
    return C.default_text(name)[:chars]


def test_choose_phi_maximises_coverage() -> None:
    g = torch.Generator().manual_seed(0)
    lse = torch.cat(
        [torch.randn(2000, generator=g, dtype=torch.float64) * 3 + 6, torch.tensor([40.0, -30.0])]
    )
    n = torch.randint(1, 600, (2002,), generator=g).double()
    phi = C.choose_phi(lse, n, WINDOW_FP16)
    best = max(C.coverage(lse, n, float(p), WINDOW_FP16) for p in torch.linspace(-20, 30, 2001))
    assert C.coverage(lse, n, phi, WINDOW_FP16) >= best
    assert C.choose_phi(torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)) == 0.0
    # one row: anywhere in its interval, preferably the middle
    phi = C.choose_phi(torch.tensor([5.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64))
    assert abs(phi - (5.0 - 11.0 + 5.0 + 9.0) / 2) < 1e-9


def test_cache_key_follows_the_model_files(tmp_path: Path, tmp_cache: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 100)
    key = K.model_key(model)
    assert K.calibration_path(model) == tmp_cache / "models" / key / "softmax.json"
    os.utime(model, ns=(1, 1))
    assert K.model_key(model) != key  # an edited model never matches a stale calibration


def test_policy_resolution(tiny_model: Path) -> None:
    layers = 2
    assert K.softmax_policy("auto", tiny_model, layers).mode == "exact"
    assert K.softmax_policy("exact", tiny_model, layers).mode == "exact"
    unified = K.softmax_policy("unified", tiny_model, layers)
    assert unified.mode == "unified" and unified.phi == (0.0,)
    with pytest.raises(FlashDecodeError):
        K.softmax_policy("fastest", tiny_model, layers)

    path = K.save_calibration(tiny_model, K.Calibration(phi=[1.5, -2.0], phi_global=0.5, per_layer=True))
    auto = K.softmax_policy("auto", tiny_model, layers)
    assert auto.mode == "unified" and auto.phi == (1.5, -2.0)
    assert K.softmax_policy("auto", tiny_model, 3).mode == "exact"  # wrong layer count: not this model
    path.write_text("{not json")
    assert K.softmax_policy("auto", tiny_model, layers).mode == "exact"
    path.write_text(json.dumps({"format": K.FORMAT, "version": K.VERSION, "phi": [1e9, 0.0]}))
    assert K.load_calibration(tiny_model) is None


def test_calibrate_stores_phi_and_the_engine_uses_it(tiny_model: Path, tmp_cache: Path) -> None:
    calibration, path = C.calibrate(tiny_model, short("calibration.txt"), short("heldout.txt"), num_threads=1)
    assert path is not None and path.is_file() and tmp_cache in path.parents
    data = json.loads(path.read_text())
    assert data["format"] == K.FORMAT and len(data["phi"]) == 2 and data["model"]["path"] == str(tiny_model)
    held = data["heldout"]
    # one row per (layer, head, query position): 2 layers x 6 heads of the tiny Llama, every token
    tok = LLM(model=str(tiny_model), num_threads=1).get_tokenizer()
    assert held["tokens"] == len(tok.encode(short("heldout.txt")))
    assert data["calibration"]["tokens"] == len(tok.encode(short("calibration.txt")))
    assert held["rows"] == 2 * 6 * held["tokens"] and held["engine"]["rows_checked"] == held["rows"]
    for rate in (*held["fallback_rate"].values(), *data["calibration"]["fallback_rate"].values()):
        assert 0.0 <= rate <= 1.0
    assert held["fallback_rate"]["fp32"] == held["engine"]["fallbacks"] / held["rows"]
    report = C.format_report(calibration, path).splitlines()
    # the report shows what was stored: every layer's phi, the row counts, where it went
    assert ", ".join(f"{p:.2f}" for p in data["phi"]) in report[1]
    assert f"{held['tokens']} tokens, {held['rows']} attention rows" in report[3]
    assert report[-1] == f"saved: {path}"

    prompts = ["The sea", "Once upon a time", "1, 2, 3,"]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    auto = LLM(model=str(tiny_model), num_threads=1)  # softmax="auto" finds the calibration
    assert auto.engine.model.softmax.mode == "unified"
    assert list(auto.engine.model.softmax.phi) == calibration.phi
    exact = LLM(model=str(tiny_model), num_threads=1, softmax="exact")
    out_auto = [o.outputs[0].token_ids for o in auto.generate(prompts, greedy)]
    out_exact = [o.outputs[0].token_ids for o in exact.generate(prompts, greedy)]
    assert out_auto == out_exact
    assert auto.engine.stats().attention_rows_checked > 0
    assert exact.engine.stats().attention_rows_checked == 0


def test_cli_calibrate(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, held = tmp_path / "cal.txt", tmp_path / "held.txt"
    text.write_text(short("calibration.txt", 600))
    held.write_text(short("heldout.txt", 600))
    argv = ["calibrate", "--model", str(tiny_model), "--text", str(text), "--heldout", str(held)]
    assert main([*argv, "--threads", "1"]) == 0
    out = capsys.readouterr().out
    saved = K.calibration_path(tiny_model)  # where the engine looks for this model's calibration
    assert out.strip().splitlines()[-1] == f"saved: {saved}"
    data = json.loads(saved.read_text())
    assert data["model"]["path"] == str(tiny_model)
    assert data["calibration"]["sha256"] == hashlib.sha256(text.read_text().encode()).hexdigest()
    assert data["heldout"]["sha256"] == hashlib.sha256(held.read_text().encode()).hexdigest()
    assert ", ".join(f"{p:.2f}" for p in data["phi"]) in out
    assert main(["calibrate", "--model", str(tiny_model), "--text", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flashdecode: error:") and "\n" not in err
