"""benchmarks/peers.py's bookkeeping: summaries, ratios, roofline fractions and the report, on made-up
measurements (the measurements themselves run in CI's ``peers.py --quick``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from flashdecode.tools import roofline
from flashdecode.utils.paths import cache_dir, write_json

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("peers", ROOT / "benchmarks" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["peers"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _cached_ceilings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHDECODE_CACHE_DIR", str(tmp_path / "cache"))
    entry = {"bandwidth": 30e9, "flops": {"fp32": 2e11, "bf16": 7e11, "int8": 1.4e12}, "measured_at": "t"}
    data = {"version": roofline.CACHE_VERSION, roofline._cache_key(2): entry}
    write_json(cache_dir() / roofline.CACHE_FILE, data)


def test_summary_ratios_fractions_and_report(peers, gguf_model, tmp_path: Path) -> None:
    path = str(gguf_model("llama", "Q4_0"))
    files = dict.fromkeys(peers.ENGINES, path)
    models = [
        {"key": "embedded", "label": "tiny Q4_0", "files": files, "roofline_file": path, "batched": True}
    ]
    tasks = [
        {"kind": "decode", "batch": 1, "prompt_len": 8, "gen_len": 4},
        {"kind": "decode", "batch": 4, "prompt_len": 8, "gen_len": 4},
        {"kind": "prefill", "batch": 1, "prompt_len": 512},
    ]

    def result(engine, rep, bw, decode, batched, prefill):
        rates = [
            {**tasks[0], "tok_s": decode},
            {**tasks[1], "tok_s": batched},
            {**tasks[2], "tok_s": prefill},
        ]
        if batched is None:  # a tool this peer's build lacks
            rates[1] = {**tasks[1], "error": "n/a: no llama-batched-bench"}
        return {"engine": engine, "model_key": "embedded", "rep": rep, "bandwidth": bw, "tasks": rates}

    results = [
        result("flashdecode", 0, 30e9, 100.0, 500.0, 1000.0),
        result("transformers", 0, 30e9, 20.0, 60.0, 500.0),
        result("llama.cpp", 0, 60e9, 400.0, 200.0, 4000.0),
        result("ik_llama.cpp", 0, 30e9, 80.0, None, 900.0),
        result("flashdecode", 1, 60e9, 140.0, 600.0, 1200.0),
        result("transformers", 1, 30e9, 30.0, 70.0, 700.0),
        {"engine": "llama.cpp", "model_key": "embedded", "rep": 1, "error": "exit 1: boom"},
        result("flashdecode", 2, 30e9, 120.0, 550.0, 1100.0),
        result("transformers", 2, 30e9, 25.0, 65.0, 600.0),
    ]
    summary = peers.summarize(models, tasks, results, threads=2)
    decode, batched, prefill = summary["rows"]
    fd, lc, ik, hf = (decode["engines"][e] for e in peers.ENGINES)
    assert fd["tok_s"] == {"median": 120.0, "min": 100.0, "max": 140.0, "n": 3}
    assert lc["tok_s"]["n"] == 1 and lc["errors"] == ["exit 1: boom"]
    assert (
        peers._ratio(fd, hf) == "4.80x"
        and peers._ratio(fd, lc) == "0.30x"
        and peers._ratio(fd, ik) == "1.50x"
    )
    assert peers._cell(batched["engines"]["ik_llama.cpp"]) == "n/a"
    # each run's fraction is against the bound at its own process's bandwidth
    bound_30 = peers.roofline_bound(path, tasks[0], 30e9, 2)
    bound_60 = peers.roofline_bound(path, tasks[0], 60e9, 2)
    assert bound_60 == pytest.approx(2 * bound_30)  # decode is memory-bound
    # fractions 100/b30, 140/b60 = 70/b30 and 120/b30: the fastest run is not the closest to its bound
    assert fd["fraction"]["median"] == pytest.approx(100 / bound_30)
    assert fd["fraction"]["min"] == pytest.approx(140 / bound_60)

    report = {
        "quick": False,
        "machine": peers.machine_description(2),
        "ceilings": None,
        "reps": 3,
        "threads": 2,
        "decode_prompt": 8,
        "decode_len": 4,
        "batched_len": 4,
        "models": models,
        "tasks": tasks,
        "results": results,
        "summary": summary,
        "commands": ["python benchmarks/peers.py"],
    }
    md = peers.render_markdown(report, "benchmarks.png")
    row = "| tiny Q4_0 | decode B=1 at depth 8 | 120 (100-140) | 400 | 80 | 25 (20-30) |"
    assert row + " 0.30x | 1.50x | 4.80x |" in md
    assert "llama.cpp on embedded: exit 1: boom" in md
    # the targets: 1.5x llama.cpp and 1.0x ik_llama.cpp at batch 1, 2x llama.cpp batched, 1.0x ik prefill
    assert "embedded, decode B=1 at depth 8, vs ik_llama.cpp: 1.50x (target >= 1x): **met**" in md
    assert "embedded, decode B=1 at depth 8, vs llama.cpp: 0.30x (target >= 1.5x): **not met**" in md
    assert "embedded, decode B=4, vs llama.cpp: 2.75x (target >= 2x): **met**" in md
    assert "embedded, prefill 512, vs ik_llama.cpp: 1.22x (target >= 1x): **met**" in md
    pytest.importorskip("matplotlib")
    chart = tmp_path / "chart.png"
    assert peers.write_chart(chart, models, tasks, summary)
    assert chart.read_bytes()[:4] == b"\x89PNG"
