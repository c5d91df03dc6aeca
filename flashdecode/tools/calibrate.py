"""``flashdecode calibrate``: FlashDecoding++'s unified max value (Hong et al., MLSys 2024, section 3).

The unified-max softmax (``ops/attention.py``) subtracts one constant phi per layer instead of each
row's max; a row whose log-sum-exp lands outside the safe window around phi is recomputed exactly.
``calibrate`` runs sample text through the model with exact attention, records for every attention
row (layer, query position, head) the exact log-sum-exp of its scaled logits and its key count n,
and picks phi so that as many rows as possible satisfy the window check

    a + log n <= lse - phi <= b        i.e.  phi in [lse - b, lse - a - log n]

for the narrowest window the engine uses (``WINDOW_FP16``, fp16 probabilities on a GPU; the CPU
path's fp32 window contains it). Each row is an interval of good phi; the chosen phi is the middle
of the widest stretch covered by the most intervals (a sweep over the interval ends). One phi per
layer is kept when it beats a single global phi on the calibration text, else the global one. The
fallback rates are then measured on held-out text, both from the recorded rows and by running the
engine's unified path and reading its fallback counter.

The result is stored by engine/calibration.py (the file format, and how the engine reads it).
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..engine.calibration import Calibration, save_calibration
from ..entrypoints.llm import LLM
from ..errors import FlashDecodeError
from ..layers.attention import MAX_ABS_PHI, WINDOW_FP16, WINDOW_FP32, SoftmaxPolicy
from ..sampling_params import SamplingParams

CHUNK_TOKENS = 512  # tokens per calibration prompt: rows see 1..512 keys


# --- statistics and the choice of phi ---------------------------------------------------------


class RowStats:
    """Per layer: the exact log-sum-exp and key count of every attention row seen (an observer for
    ``SoftmaxPolicy.observer``)."""

    def __init__(self, num_layers: int):
        self._lse: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self._n: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]

    def __call__(self, layer: int, lse: torch.Tensor, n: torch.Tensor) -> None:
        self._lse[layer].append(lse.detach().flatten().double().cpu())
        self._n[layer].append(n.detach().flatten().double().cpu())

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._lse[index]:
            return torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)
        return torch.cat(self._lse[index]), torch.cat(self._n[index])

    @property
    def num_layers(self) -> int:
        return len(self._lse)

    def rows(self) -> int:
        return sum(sum(t.numel() for t in per) for per in self._lse)


def _intervals(lse: torch.Tensor, n: torch.Tensor, window: tuple[float, float]):
    a, b = window
    return lse - b, lse - a - torch.log(n)


def coverage(lse: torch.Tensor, n: torch.Tensor, phi: float, window: tuple[float, float]) -> int:
    """Rows whose window check passes at ``phi`` (the ones that need no fallback)."""
    lo, hi = _intervals(lse, n, window)
    return int(((lo <= phi) & (phi <= hi)).sum())


def choose_phi(lse: torch.Tensor, n: torch.Tensor, window: tuple[float, float] = WINDOW_FP16) -> float:
    """The phi that the most rows accept, in the middle of the widest such stretch."""
    if lse.numel() == 0:
        return 0.0
    lo, hi = _intervals(lse, n, window)
    lo_sorted, hi_sorted = torch.sort(lo).values, torch.sort(hi).values
    cands = torch.unique(torch.cat([lo, hi]))  # sorted
    # rows accepting c: lo <= c minus hi < c
    cover = torch.searchsorted(lo_sorted, cands, right=True) - torch.searchsorted(hi_sorted, cands)
    best = int(cover.max())
    at_best = (cover == best).nonzero().flatten()
    # group consecutive candidates at the best coverage into stretches; pick the widest
    breaks = (at_best[1:] - at_best[:-1] != 1).nonzero().flatten() + 1
    bounds = [0, *breaks.tolist(), at_best.numel()]
    stretches = [(cands[at_best[s]], cands[at_best[e - 1]]) for s, e in zip(bounds[:-1], bounds[1:])]
    left, right = max(stretches, key=lambda st: float(st[1] - st[0]))
    phi = float((left + right) / 2)
    if coverage(lse, n, phi, window) < best:  # an interval ends exactly inside the stretch
        phi = float(left)
    return max(-MAX_ABS_PHI, min(MAX_ABS_PHI, phi))


def fallback_rate(stats: RowStats, phi: list[float], window: tuple[float, float]) -> float:
    total = bad = 0
    for i in range(stats.num_layers):
        lse, n = stats.layer(i)
        total += lse.numel()
        bad += lse.numel() - coverage(lse, n, phi[i], window)
    return bad / total if total else 0.0


# --- running text through the model -----------------------------------------------------------


def default_text(name: str) -> str:
    return resources.files("flashdecode").joinpath("data", name).read_text(encoding="utf-8")


def _prompts(llm: Any, text: str) -> list[list[int]]:
    tok = llm.get_tokenizer()
    ids = tok.encode(text)
    if not ids:
        raise FlashDecodeError("the calibration text is empty")
    size = max(2, min(CHUNK_TOKENS, llm.engine.max_model_len - 1))
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def record_rows(llm: Any, text: str) -> tuple[RowStats, int]:
    """Run ``text`` through the engine with exact attention; return every row's statistics and the
    number of tokens."""
    engine = llm.engine
    stats = RowStats(engine.spec.num_layers)
    before = engine.model.softmax
    engine.model.softmax = SoftmaxPolicy("exact", observer=stats)
    try:
        prompts = _prompts(llm, text)
        llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=1))
    finally:
        engine.model.softmax = before
    return stats, sum(len(p) for p in prompts)


def measure_engine_fallbacks(llm: Any, text: str, phi: list[float]) -> tuple[int, int]:
    """(fallback rows, checked rows) of the engine's own unified path over ``text``."""
    engine = llm.engine
    before = engine.model.softmax
    policy = SoftmaxPolicy("unified", phi=tuple(phi))
    engine.model.softmax = policy
    try:
        prompts = _prompts(llm, text)
        llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=1))
    finally:
        engine.model.softmax = before
    return policy.fallbacks, policy.rows_checked


def calibrate(
    model: str | Path | None = None,
    text: str | None = None,
    heldout: str | None = None,
    num_threads: int | None = None,
    save: bool = True,
    llm: Any = None,
) -> tuple[Calibration, Path | None]:
    """Calibrate phi for ``model`` on ``text`` (default: the shipped calibration.txt), measure the
    fallback rates on ``heldout`` (default: heldout.txt), and store the result. A given ``llm``
    must have prefix caching off (cached rows are neither observed nor checked)."""
    if llm is None:
        # no prefix cache: every pass over a text must compute (and so observe) every row
        llm = LLM(model=model, softmax="exact", num_threads=num_threads, enable_prefix_caching=False)
    text = default_text("calibration.txt") if text is None else text
    heldout = default_text("heldout.txt") if heldout is None else heldout

    stats, tokens = record_rows(llm, text)
    layers = stats.num_layers
    all_lse = torch.cat([stats.layer(i)[0] for i in range(layers)])
    all_n = torch.cat([stats.layer(i)[1] for i in range(layers)])
    phi_global = choose_phi(all_lse, all_n, WINDOW_FP16)
    phi_layers = [choose_phi(*stats.layer(i), WINDOW_FP16) for i in range(layers)]
    rate_global = fallback_rate(stats, [phi_global] * layers, WINDOW_FP16)
    rate_layers = fallback_rate(stats, phi_layers, WINDOW_FP16)
    per_layer = rate_layers < rate_global
    phi = phi_layers if per_layer else [phi_global] * layers

    held, held_tokens = record_rows(llm, heldout)
    engine_bad, engine_rows = measure_engine_fallbacks(llm, heldout, phi)
    report = {
        "calibration": {
            "tokens": tokens,
            "rows": stats.rows(),
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "fallback_rate": {
                "fp16": fallback_rate(stats, phi, WINDOW_FP16),
                "fp32": fallback_rate(stats, phi, WINDOW_FP32),
                "fp16_global_phi": rate_global,
                "fp16_per_layer_phi": rate_layers,
            },
        },
        "heldout": {
            "tokens": held_tokens,
            "rows": held.rows(),
            "sha256": hashlib.sha256(heldout.encode()).hexdigest(),
            "fallback_rate": {
                "fp16": fallback_rate(held, phi, WINDOW_FP16),
                "fp32": fallback_rate(held, phi, WINDOW_FP32),
                "fp16_global_phi": fallback_rate(held, [phi_global] * layers, WINDOW_FP16),
                "fp16_per_layer_phi": fallback_rate(held, phi_layers, WINDOW_FP16),
                "fp16_phi_zero": fallback_rate(held, [0.0] * layers, WINDOW_FP16),
            },
            "engine": {"fallbacks": engine_bad, "rows_checked": engine_rows},
        },
    }
    calibration = Calibration(phi=phi, phi_global=phi_global, per_layer=per_layer, report=report)
    path = save_calibration(model, calibration) if save else None
    return calibration, path


def format_report(calibration: Calibration, path: Path | None) -> str:
    cal, held = calibration.report["calibration"], calibration.report["heldout"]
    rate, cal_rate = held["fallback_rate"], cal["fallback_rate"]
    eng = held["engine"]
    phis = ", ".join(f"{p:.2f}" for p in calibration.phi)
    lines = [
        f"calibration text: {cal['tokens']} tokens, {cal['rows']} attention rows",
        f"phi ({'per layer' if calibration.per_layer else 'one for every layer'}): {phis}",
        f"  fp16-window fallback on the calibration text: per-layer phi "
        f"{cal_rate['fp16_per_layer_phi']:.3%}, global phi {cal_rate['fp16_global_phi']:.3%}",
        f"held-out text: {held['tokens']} tokens, {held['rows']} attention rows; fallback rate",
        f"  fp32 window {list(WINDOW_FP32)} (the CPU path):      {rate['fp32']:.3%}"
        f"   (engine counted {eng['fallbacks']} of {eng['rows_checked']} rows)",
        f"  fp16 window {list(WINDOW_FP16)} (Triton, fp16 inputs): {rate['fp16']:.3%}"
        f"   (phi = 0 everywhere: {rate['fp16_phi_zero']:.3%})",
    ]
    if path is not None:
        lines.append(f"saved: {path}")
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------------


def add_arguments(p: Any) -> None:
    p.add_argument("--model", default=None, help="GGUF file or Hugging Face folder (default: embedded)")
    p.add_argument("--text", default=None, help="calibration text file (default: the shipped sample)")
    p.add_argument("--heldout", default=None, help="held-out text file for the fallback rate")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")


def _read_text(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise FlashDecodeError(f"cannot read {path}: {exc}") from exc


def run(args: Any) -> int:
    text, heldout = _read_text(args.text), _read_text(args.heldout)
    calibration, path = calibrate(args.model, text, heldout, num_threads=args.threads)
    print(format_report(calibration, path))
    return 0
