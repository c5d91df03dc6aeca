"""``flashdecode tune``: measures the heuristic dataflow (FlashDecoding++ section 5) on this machine.

For each distinct linear shape of a model (storage format and [N, K]: fused qkv, o, fused gate/up,
down, lm_head), every applicable candidate kernel (layers/linear.py) is timed at M = 1, 2, 4, ..., 512
with cold weights: each call runs on the next of several copies of the weight whose total size is
at least twice the last-level cache, so every call streams its weights from memory as decoding
does. Candidates are interleaved round-robin, so drift and load from other processes hit all candidates
alike, and each time is the median of the faster half of its samples (``robust_time``); the grid
points next to a change of winner are measured again before a crossover is accepted. A measurement
that looks disturbed (``disturbance``: its faster half of repeats disagree, or its time is far above
the roofline bound of the weight's bytes and FLOPs without a second measurement agreeing) is
measured again, up to ``MAX_REMEASURES`` times; a shape whose measurements never settle keeps the
default plan, and the table records why (``ShapeResult.unsettled``). A candidate
far slower than the best is dropped for larger M (the answer is clear there); where the winner
changes between two grid points the gap is bisected to find the crossover. The result, per shape,
is a ``Plan``: the winner per M range.

The table it writes, and how the engine follows it, are layers/dataflow.py's. Rerunning ``tune``
re-measures the model's shapes and replaces them.

Per-kernel timings cannot see everything the engine does with a plan (a decode batch whose projections
all run flat GEMMs runs as one native step, models/native_decode.py), and a machine shared with other
processes can mislead any timing. So before a table is saved, ``end_to_end_gate`` runs the engine
itself, decode at batch 1 and 8 and a prefill, with the new plans and with the default plan,
interleaved over rounds, and keeps the table's shapes for this model only if no workload's median is
slower than the default's by more than ``E2E_TOLERANCE``: the tuned dataflow never makes the engine
slower than not tuning.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..engine.numerics import use_int8_activations
from ..entrypoints.llm import LLM
from ..errors import FlashDecodeError
from ..layers.dataflow import (
    DataflowTable,
    ShapeResult,
    configure,
    fingerprint,
    format_plan,
    is_approx,
    static_plan,
    table_path,
)
from ..layers.linear import Linear, Plan, iter_linears
from ..layers.quant import QuantizedTensor
from ..models.decoder import Decoder
from ..models.loader import load_model
from ..sampling_params import SamplingParams
from ..utils.cpuinfo import last_level_cache_bytes, physical_cores
from .roofline import Ceilings, StepCost, machine_ceilings

M_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
DROP_FACTOR = 4.0  # a candidate this many times slower than the best is not measured at larger M
HYSTERESIS = 0.03  # keep the previous winner while it is within 3% of the best (fewer noisy switches)
# interference detection: the faster half of a measurement's repeats may spread by this much, and a
# time this many times the roofline bound needs a second measurement that agrees (within the spread)
SPREAD_TOLERANCE = 0.25
ROOFLINE_FACTOR = 8.0
MAX_REMEASURES = 3

# --- measuring ----------------------------------------------------------------------------------------


def clone_linear(linear: Linear) -> Linear:
    """A Linear over a private copy of the weight (another place in memory)."""
    w = linear.weight
    if isinstance(w, QuantizedTensor):
        w = QuantizedTensor(w.format, w.qs.clone(), w.d.clone(), None if w.m is None else w.m.clone())
    else:
        w = w.clone()
    return Linear(w, None if linear.bias is None else linear.bias.clone(), linear.backend)


def weight_bytes(linear: Linear) -> int:
    """The fewest bytes of the weight a candidate reads: the stored planes, or the int8 repack where
    it is built and smaller (the lean K-quants' two-level scales, Q5_0's fp16)."""
    w = linear.weight
    stored = w.nbytes if isinstance(w, QuantizedTensor) else w.numel() * w.element_size()
    repack = linear.i8_nbytes()
    return stored if repack is None else min(stored, repack)


class ColdRunner:
    """Runs a candidate over rotating weight copies totalling at least ``rotate_bytes``."""

    def __init__(self, linear: Linear, rotate_bytes: int, max_copies: int = 512):
        n = max(1, min(max_copies, -(-rotate_bytes // max(1, weight_bytes(linear)))))
        self.copies = [linear] + [clone_linear(linear) for _ in range(n - 1)]
        self.i = 0

    def fn(self, name: str) -> Callable[[torch.Tensor], Any]:
        impls = [c.impl(name) for c in self.copies]

        def run(x: torch.Tensor) -> Any:
            self.i = (self.i + 1) % len(impls)
            return impls[self.i](x)

        return run


def robust_time(samples: list[float]) -> float:
    """The median of the faster half of the samples: other processes only ever add time, in bursts,
    so the slow half is where the noise is; on a quiet machine this is the median."""
    ordered = sorted(samples)
    return statistics.median(ordered[: (len(ordered) + 1) // 2])


def disturbance(samples: list[float], bound: float | None, earlier: float | None = None) -> str | None:
    """Why a candidate's samples at one M look disturbed by other processes, or None: the faster half
    of its repeats disagree by more than ``SPREAD_TOLERANCE`` (load came and went during it), or its
    time is more than ``ROOFLINE_FACTOR`` times the roofline ``bound`` and ``earlier`` (its previous
    measurement, if any) does not agree with it. A kernel that is really that slow is slow again when
    measured again; load does not repeat itself so exactly."""
    fast = sorted(samples)[: (len(samples) + 1) // 2]
    if fast[-1] > fast[0] * (1 + SPREAD_TOLERANCE):
        return f"repeats disagree ({fast[0] * 1e6:.1f}-{fast[-1] * 1e6:.1f} us in the faster half)"
    t = robust_time(samples)
    if bound is None or t <= ROOFLINE_FACTOR * bound:
        return None
    if earlier is not None and abs(t - earlier) <= SPREAD_TOLERANCE * min(t, earlier):
        return None
    return f"{t * 1e6:.1f} us, {t / bound:.0f}x the roofline bound, not reproduced"


def roofline_bound(linear: Linear, m: int, ceilings: Ceilings) -> float:
    """The least time ``linear`` can take at M = ``m`` on this machine: read the stored weight and the
    activations, write the output, and do 2 M N K FLOPs at the matmul ceiling of its format."""
    n, k = linear.out_features, linear.in_features
    elem = torch.empty((), dtype=linear.compute_dtype).element_size()
    cost = StepCost(
        tokens=m,
        flops=2.0 * m * n * k,
        weight_bytes=weight_bytes(linear),
        kv_read_bytes=0.0,
        kv_write_bytes=0.0,
        activation_bytes=m * (n + k) * elem,
    )
    compute = "int8" if linear.quantized else "bf16" if linear.format == "BF16" else "fp32"
    return cost.time_bound(ceilings, compute)


class Unsettled(Exception):
    """A shape's measurements stayed disturbed after ``MAX_REMEASURES`` re-measurements."""


def measure_settled(
    measure: Callable[[], dict[str, list[float]]], bound: float | None, max_remeasures: int = MAX_REMEASURES
) -> dict[str, list[float]]:
    """``measure()`` (candidate -> samples, interleaved), repeated while any candidate's samples are
    disturbed (``disturbance``), every candidate again so that they stay interleaved; the first
    measurement in which none is. Raises ``Unsettled`` with the reasons when none settles."""
    earlier: dict[str, float] = {}
    for _ in range(1 + max_remeasures):
        got = measure()
        why = {n: r for n, ts in got.items() if (r := disturbance(ts, bound, earlier.get(n))) is not None}
        if not why:
            return got
        earlier = {n: robust_time(ts) for n, ts in got.items()}
    raise Unsettled("; ".join(f"{n}: {r}" for n, r in sorted(why.items())))


def measure_samples(
    fns: dict[str, Callable[[torch.Tensor], Any]],
    x: torch.Tensor,
    min_reps: int = 5,
    max_reps: int = 40,
    budget_s: float = 0.4,
    drop_after: float = DROP_FACTOR,
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, interleaved round-robin after one warm-up call each, so
    drift and bursts of load hit every candidate alike. A candidate whose warm-up is ``drop_after``
    times the fastest warm-up is timed once more (its answer is clear)."""
    warm = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn(x)
        warm[name] = time.perf_counter() - t0
    fastest = min(warm.values())
    live = [n for n in fns if warm[n] <= drop_after * fastest]
    times: dict[str, list[float]] = {}
    for name in fns:
        if name not in live:
            t0 = time.perf_counter()
            fns[name](x)
            times[name] = [min(warm[name], time.perf_counter() - t0)]
    times.update({n: [] for n in live})
    start = time.perf_counter()
    rounds = 0
    while rounds < max_reps and (rounds < min_reps or time.perf_counter() - start < budget_s):
        for name in live:
            t0 = time.perf_counter()
            fns[name](x)
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return times


def measure(
    fns: dict[str, Callable[[torch.Tensor], Any]],
    x: torch.Tensor,
    min_reps: int = 5,
    max_reps: int = 40,
    budget_s: float = 0.4,
    drop_after: float = DROP_FACTOR,
) -> dict[str, float]:
    """``robust_time`` per candidate of ``measure_samples``."""
    samples = measure_samples(fns, x, min_reps, max_reps, budget_s, drop_after)
    return {n: robust_time(ts) for n, ts in samples.items()}


def _hopeless(times: dict[int, float], m: int, best: float) -> bool:
    """Far slower than the best at ``m`` and already growing about linearly in M (compute-bound): it
    cannot catch up at larger M. A candidate with a large fixed cost (dequantize, then GEMM) keeps
    being measured, since that cost is amortized as M grows."""
    t = times[m]
    if t > max(0.25, 20 * best):  # so slow that one more call costs more than it could teach
        return True
    if t <= DROP_FACTOR * best or m < 16:
        return False
    smaller = [p for p in times if p <= m // 4]
    if not smaller:
        return False
    p = max(smaller)
    return t / times[p] >= 0.8 * m / p


def _winner(times: dict[str, float], previous: str | None) -> str:
    best = min(times, key=times.get)
    if previous in times and times[previous] <= times[best] * (1 + HYSTERESIS):
        return previous
    return best


def tune_linear(
    linear: Linear,
    allow_approx: bool = False,
    m_grid: Iterable[int] = M_GRID,
    rotate_bytes: int | None = None,
    budget_s: float = 0.4,
    min_reps: int = 5,
    refine: bool = True,
    progress: Callable[[], None] | None = None,
    ceilings: Ceilings | None = None,
) -> ShapeResult:
    """Time every candidate of ``linear`` over ``m_grid``, bisect the crossovers, return the plan.
    ``ceilings``: the machine's roofline figures, whose bounds tell which times are implausibly slow
    (``disturbance``); without them only disagreeing repeats count as disturbed. Where the
    measurements never settle, the result has no plan (the default plan stays) and says why."""
    rotate = 2 * last_level_cache_bytes() if rotate_bytes is None else rotate_bytes
    names = linear.candidates(allow_approx=allow_approx)
    runner = ColdRunner(linear, rotate)
    fns = {name: runner.fn(name) for name in names}
    dtype = linear.compute_dtype
    gen = torch.Generator().manual_seed(0)
    k = linear.in_features
    xs = torch.randn(max(m_grid), k, generator=gen).to(dtype)
    samples: dict[str, dict[int, list[float]]] = {name: {} for name in names}
    live = list(names)

    def run(m: int, cands: list[str]) -> dict[str, float]:
        bound = None if ceilings is None else roofline_bound(linear, m, ceilings)
        try:
            got = measure_settled(
                lambda: measure_samples(
                    {c: fns[c] for c in cands}, xs[:m], min_reps=min_reps, budget_s=budget_s
                ),
                bound,
            )
        except Unsettled as exc:
            raise Unsettled(f"M={m}: {exc}") from None
        for name, ts in got.items():
            samples[name].setdefault(m, []).extend(ts)
        return {name: robust_time(samples[name][m]) for name in cands}

    def times() -> dict[str, dict[int, float]]:
        return {n: {m: robust_time(ts) for m, ts in sorted(t.items())} for n, t in samples.items() if t}

    def winners_on(grid: list[int]) -> dict[int, str]:
        out, previous = {}, None
        for m in grid:
            got = {n: t[m] for n, t in times().items() if m in t}
            previous = out[m] = _winner(got, previous)
        return out

    def search() -> None:
        nonlocal live
        previous = None
        for m in sorted(m_grid):
            got = run(m, live)
            previous = _winner(got, previous)
            live = [n for n in live if not _hopeless(times()[n], m, got[previous])]
            if progress:
                progress()
        grid = sorted(m_grid)
        # confirm: grid points next to a change of winner are measured again (more samples where the
        # answer matters, so one burst of load cannot place a crossover)
        for _ in range(2 if refine else 0):
            winners = winners_on(grid)
            suspects = {
                grid[j]
                for i in range(1, len(grid))
                if winners[grid[i]] != winners[grid[i - 1]]
                for j in (i - 1, i)
            }
            if not suspects:
                break
            for m in sorted(suspects):
                near = [winners[g] for g in grid if abs(grid.index(g) - grid.index(m)) <= 1]
                run(m, sorted(set(near)))
        # bisect between grid points whose winners differ
        winners = winners_on(grid)
        if refine:
            for a, b in zip(grid, grid[1:]):
                lo, hi = a, b
                pair = [winners[a], winners[b]]
                if pair[0] == pair[1]:
                    continue
                while hi - lo > max(1, lo // 4):
                    mid = (lo + hi) // 2
                    got = run(mid, pair)
                    if _winner(got, pair[0]) == pair[0]:
                        lo = mid
                    else:
                        hi = mid

    with torch.inference_mode():
        try:
            search()
        except Unsettled as exc:
            return ShapeResult(plan=[], times=times(), crossovers=[], unsettled=str(exc))
    return result_from_times(times())


def result_from_times(times: dict[str, dict[int, float]], exclude: Iterable[str] = ()) -> ShapeResult:
    """The plan the measurements give: at every measured M the fastest candidate measured there (the
    previous winner kept within ``HYSTERESIS``), as ranges; candidates in ``exclude`` never win."""
    exclude = set(exclude)
    points: dict[int, str] = {}
    previous = None
    for m in sorted({m for ts in times.values() for m in ts}):
        got = {n: ts[m] for n, ts in times.items() if m in ts and n not in exclude}
        if got:
            previous = points[m] = _winner(got, previous)
    plan: Plan = []
    for m in sorted(points):
        if not plan or plan[-1][1] != points[m]:
            plan.append((m, points[m]))
    plan[0] = (1, plan[0][1])
    return ShapeResult(
        plan=plan,
        times=times,
        crossovers=[m for m, _ in plan[1:]],
        allow_approx=any(is_approx(n) for _, n in plan),
    )


def distinct_linears(modules: Iterable[Any]) -> dict[str, Linear]:
    """One representative Linear per shape key, in first-seen order."""
    out: dict[str, Linear] = {}
    for linear in iter_linears(modules):
        out.setdefault(linear.shape_key(), linear)
    return out


def tune_model(
    model: str | None = None,
    num_threads: int | None = None,
    allow_approx: bool = False,
    quick: bool = False,
    quantization: str | None = None,
    save: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[DataflowTable, Path | None]:
    """Tune every distinct linear shape of ``model`` on this machine and merge them into its table."""
    threads = num_threads or physical_cores()
    torch.set_num_threads(threads)
    loaded = load_model(model)
    dtype = torch.bfloat16 if loaded.formats.get("embed") in ("BF16", "bfloat16") else torch.float32
    decoder = Decoder(loaded, dtype, dataflow="off", quantization=quantization)
    shapes = distinct_linears(decoder.linears())
    grid = (1, 4, 16, 64) if quick else M_GRID
    ceilings = machine_ceilings(threads)
    fp = fingerprint(threads)
    table = DataflowTable.load(table_path(fp)) if save else None
    if table is None or table.fingerprint != fp:
        table = DataflowTable(fingerprint=fp)
    bar = None
    if progress:
        bar = tqdm(total=len(shapes) * len(grid), desc="tuning", unit="point")
    try:
        for key, linear in shapes.items():
            if bar is not None:
                bar.set_postfix_str(key)
            result = tune_linear(
                linear,
                allow_approx=allow_approx,
                m_grid=grid,
                budget_s=0.05 if quick else 0.4,
                min_reps=1 if quick else 5,
                rotate_bytes=(8 << 20) if quick else None,
                refine=not quick,
                progress=None if bar is None else (lambda: bar.update(1)),
                ceilings=ceilings,
            )
            table.shapes[key] = result
    finally:
        if bar is not None:
            bar.close()
    source = str(loaded.source)
    shapes = list(shapes)  # the keys: the measured Linears (and the model behind them) can go
    del decoder, loaded
    table.models[source] = shapes
    approx = sorted({n for k in shapes for _, n in table.shapes[k].plan if is_approx(n)})
    if approx:
        # approximate kernels must keep held-out perplexity within PPL_TOLERANCE of the exact path
        gate = perplexity_gate(model, approx, threads)
        table.gates[source] = gate
        failed = [n for n in approx if n not in gate["allowed"]]
        for key in shapes:
            if failed and not table.shapes[key].unsettled:
                table.shapes[key] = result_from_times(table.shapes[key].times, exclude=failed)
        log(
            f"perplexity gate (held-out text, {gate['tokens']} tokens): exact {gate['exact']:.4f}; "
            + ", ".join(
                f"{n} {gate['ppl'][n]:.4f} ({'kept' if n in gate['allowed'] else 'dropped'})" for n in approx
            )
        )
    gate = end_to_end_gate(model, table, threads, quick=quick)
    table.gates[f"{source} end to end"] = gate
    log(
        "end to end, tokens/s with the table vs the default plan: "
        + ", ".join(f"{w} {gate['table'][w]:.1f} vs {gate['default'][w]:.1f}" for w in gate["table"])
        + ("" if gate["kept"] else " -> the default plan is kept for this model")
    )
    if not gate["kept"]:
        for key in shapes:
            table.shapes.pop(key, None)
        table.models.pop(source, None)
    path = table.save() if save else None
    for key in shapes:
        entry = table.shapes.get(key)
        plan = "default plan" if entry is None else format_plan(entry.plan)
        if entry is not None and entry.unsettled:
            plan = f"default plan (measurements never settled: {entry.unsettled})"
        log(f"{key:>22}  {plan}")
    return table, path


E2E_TOLERANCE = 0.03  # a tuned table may not make any workload's median tokens/s more than 3% slower
E2E_ROUNDS = 3


def e2e_workloads(quick: bool) -> dict[str, tuple[int, int, int]]:
    """name -> (sequences, prompt tokens, generated tokens)."""
    n = 8 if quick else 32
    return {"decode b=1": (1, 16, n), "decode b=8": (8, 16, n), "prefill": (1, 64 if quick else 256, 1)}


def time_workload(llm: Any, batch: int, prompt_len: int, gen: int) -> float:
    """Tokens/s of one workload: generated tokens per second for decode, prompt tokens for prefill."""
    vocab = llm.engine.spec.vocab_size
    prompts = [
        {"prompt_token_ids": [(7 * i + 13 * j + 5) % vocab for j in range(prompt_len)]} for i in range(batch)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts, params)
    return batch * (prompt_len if gen == 1 else gen) / (time.perf_counter() - start)


def gate_decision(
    table_rates: dict[str, list[float]], default_rates: dict[str, list[float]]
) -> dict[str, Any]:
    """Keep the table when no workload's median with it is below (1 - E2E_TOLERANCE) x the default's."""
    med_t = {w: statistics.median(r) for w, r in table_rates.items()}
    med_d = {w: statistics.median(r) for w, r in default_rates.items()}
    kept = all(med_t[w] >= med_d[w] * (1 - E2E_TOLERANCE) for w in med_t)
    return {"table": med_t, "default": med_d, "kept": kept, "tolerance": E2E_TOLERANCE}


def end_to_end_gate(
    model: str | None, table: DataflowTable, num_threads: int, quick: bool = False, timer=time_workload
) -> dict[str, Any]:
    """The engine with ``table``'s plans against the default plan on ``e2e_workloads``, interleaved
    (and in alternating order) over ``E2E_ROUNDS`` rounds in one process, after a warm-up of each."""
    # no prefix cache: every round must compute its prompts again
    llm = LLM(
        model=model, num_threads=num_threads, max_num_seqs=8, max_model_len=512, enable_prefix_caching=False
    )
    engine = llm.engine
    linears = engine.model.linears()

    def use(with_table: bool) -> None:
        configure(linears, "auto", table if with_table else None)
        if engine.numerics.int8_activations:
            use_int8_activations(engine.model)

    rates: dict[bool, dict[str, list[float]]] = {True: {}, False: {}}
    workloads = e2e_workloads(quick)
    for rnd in range(E2E_ROUNDS + 1):
        for with_table in (True, False) if rnd % 2 == 0 else (False, True):
            use(with_table)
            for name, (b, p, g) in workloads.items():
                rate = timer(llm, b, p, g)
                if rnd > 0:  # round 0 warms both up
                    rates[with_table].setdefault(name, []).append(rate)
    use(True)
    return gate_decision(rates[True], rates[False])


PPL_TOLERANCE = 0.01  # an approximate kernel may raise held-out perplexity by at most 1%


def heldout_perplexity(llm: Any, ids: list[int]) -> float:
    """Perplexity of the token ids under the model (teacher forcing, prompt logprobs)."""
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
    logprobs = [entry[ids[t]].logprob for t, entry in enumerate(out.prompt_logprobs) if entry is not None]
    return math.exp(-statistics.fmean(logprobs))


def perplexity_gate(
    model: str | None, candidates: Iterable[str], num_threads: int | None = None, max_tokens: int = 1024
) -> dict[str, Any]:
    """Held-out perplexity (flashdecode/data/heldout.txt) with the exact kernels, and with each
    approximate candidate run at every M of every Linear that can use it: the worst case of any plan
    that contains it. A candidate is allowed when it stays within ``PPL_TOLERANCE``."""
    text = resources.files("flashdecode").joinpath("data/heldout.txt").read_text(encoding="utf-8")
    llm = LLM(model=model, dataflow="off", numerics="exact", num_threads=num_threads, max_num_seqs=1)
    ids = llm.get_tokenizer().encode(text)[: min(max_tokens, llm.engine.max_model_len - 1)]
    linears = list(iter_linears(llm.engine.model.linears()))
    exact = heldout_perplexity(llm, ids)
    ppl = {}
    for name in candidates:
        for lin in linears:
            lin.set_plan([(1, name)] if name in lin.candidates(allow_approx=True) else static_plan(lin))
        ppl[name] = heldout_perplexity(llm, ids)
    allowed = [n for n, p in ppl.items() if p <= exact * (1 + PPL_TOLERANCE)]
    return {"tokens": len(ids), "exact": exact, "ppl": ppl, "allowed": allowed, "tolerance": PPL_TOLERANCE}


# --- command line ---------------------------------------------------------------------------------


def add_arguments(p: Any) -> None:
    p.add_argument("--model", default=None, help="GGUF file or Hugging Face folder (default: embedded)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument(
        "--allow-approx",
        action="store_true",
        help="also consider kernels that round weights or activations (bf16)",
    )
    p.add_argument("--quick", action="store_true", help="a coarse M grid and short timings (a smoke test)")
    p.add_argument(
        "--quantization", choices=("int8", "int4"), default=None, help="tune a float model served quantized"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: Any) -> int:
    if args.threads is not None and args.threads < 1:
        raise FlashDecodeError(f"--threads {args.threads}: must be a positive integer")
    _, path = tune_model(
        args.model,
        num_threads=args.threads,
        allow_approx=args.allow_approx,
        quick=args.quick,
        quantization=args.quantization,
        progress=not args.no_progress,
    )
    print(f"table: {path}")
    return 0
