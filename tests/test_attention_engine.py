"""The unified-max softmax inside the engine, on the embedded SmolLM2-135M: same greedy tokens as exact
attention, fallbacks counted in the engine's stats."""

from __future__ import annotations

from pathlib import Path

import pytest

from flashdecode import LLM, SamplingParams
from flashdecode.cli import build_parser
from flashdecode.layers.attention import WINDOW_FP16, SoftmaxPolicy

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea, the wind and the rain:",
    "def fibonacci(n):",
    "Once upon a time, in a kingdom far away, there lived a princess who",
    "Question: what do bees make? Answer:",
]
GREEDY = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHDECODE_CACHE_DIR", str(tmp_path / "cache"))  # no calibration: auto = exact


def tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def test_unified_greedy_tokens_equal_exact() -> None:
    # exact numerics: with int8 activations a softmax's last-bit differences can move a rounding
    exact = LLM(max_model_len=256, num_threads=1, softmax="exact", numerics="exact")
    reference = tokens(exact)
    assert exact.engine.stats().attention_rows_checked == 0
    del exact

    unified = LLM(
        max_model_len=256, num_threads=1, softmax="unified", enable_prefix_caching=False, numerics="exact"
    )
    assert tokens(unified) == reference
    stats = unified.engine.stats()
    spec = unified.engine.spec
    prompt_tokens = sum(len(unified.get_tokenizer().encode(p)) for p in PROMPTS)
    # every computed token's row of every head of every layer was checked (the last sampled token is
    # never fed back); the fp32 window at phi = 0 needed no fallback
    rows = (prompt_tokens + 5 * 63) * spec.num_heads * spec.num_layers
    assert stats.attention_rows_checked == rows
    assert stats.attention_fallbacks == 0

    # the fp16 window at phi = 0 sends a few percent of the rows to the exact path: same tokens
    unified.engine.model.softmax = SoftmaxPolicy("unified", phi=0.0, window=WINDOW_FP16)
    assert tokens(unified) == reference
    stats = unified.engine.stats()
    assert 0 < stats.attention_fallbacks < stats.attention_rows_checked == rows


def test_auto_without_calibration_is_exact_and_cli_flag_parses() -> None:
    llm = LLM(max_model_len=64, num_threads=1)
    assert llm.engine.model.softmax.mode == "exact"
    args = build_parser().parse_args(["generate", "hi", "--softmax", "unified"])
    assert args.softmax == "unified"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "hi", "--softmax", "fast"])
