"""Flat GEMM and the tuned dataflow (FlashDecoding++ sections 4 and 5): every linear kernel at every M.

Models:
  smollm2       the embedded SmolLM2-135M (Q4_1 layers, Q8_0 tied head), its real weights
  llama1b-q4_0  a 1.1B Llama-shaped model (hidden 2048, 22 layers, 32 heads, 4 KV heads, intermediate
                5632, vocab 32000) with random weights quantized to Q4_0
  llama1b-bf16  the same, kept in bf16

Part 1, per distinct linear shape (fused qkv, o, fused gate/up, down, lm_head): the median time of
every candidate kernel (layers/linear.py) at M = 1..512 with cold weights (rotating copies larger than
twice the last-level cache, as ``flashdecode tune`` measures), the tuned table's choice (a separate
``tune_linear`` run: its own measurements and crossover bisection), and the geometric-mean speedup of
the table over each single static choice (every shape and M that choice can run). A candidate
slower than ``--cap`` seconds per call is not run at larger M: its time there is extrapolated
linearly in M (marked ``~``). A plot of time vs M per candidate, crossovers marked.

Part 2, end to end: decode tokens/s at batch 1 and 8 through the engine with the tuned table,
the default plan and ``dataflow="off"``, with the weight bytes one decode step reads and the
fraction of the memory bandwidth (measured in this process) that makes.

    python benchmarks/dataflow.py --quick      # tiny: SmolLM2 shapes at M = 1, 8, 64, 1 repetition (CI)
    python benchmarks/dataflow.py              # everything (about 10-20 minutes; run on a quiet machine)
    python benchmarks/dataflow.py --allow-approx   # also the kernels that round to bf16

Timings on a shared machine are noisy: the report gives medians; compare runs on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from flashdecode.kernels.cpu import build as cpu_kernels
from flashdecode.layers.dataflow import DataflowTable, fingerprint, format_plan
from flashdecode.layers.linear import Linear, iter_linears
from flashdecode.layers.quant import QuantizedTensor, quantize
from flashdecode.tools import tune as tuner
from flashdecode.tools.probe import measure_memory_bandwidth
from flashdecode.utils.cpuinfo import last_level_cache_bytes, physical_cores

LLAMA_1B = dict(hidden=2048, layers=22, heads=32, kv_heads=4, head_dim=64, inter=5632, vocab=32000)


# --- models ------------------------------------------------------------------------------------------


def embedded_linears() -> dict[str, Linear]:
    import flashdecode.models.decoder as decoder_mod
    from flashdecode.models.loader import load_model

    loaded = load_model(None)
    decoder = decoder_mod.Decoder(loaded, torch.float32, dataflow="off")
    return tuner.distinct_linears(decoder.linears())


def _matrix(n: int, k: int, fmt: str, gen: torch.Generator) -> torch.Tensor | QuantizedTensor:
    w = torch.randn(n, k, generator=gen) * 0.02
    return w.bfloat16() if fmt == "BF16" else quantize(w, fmt)


def llama_shapes(fmt: str) -> dict[str, Linear]:
    """One Linear per distinct shape of the 1.1B model (random weights)."""
    c = LLAMA_1B
    h, q, kv = c["hidden"], c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
    gen = torch.Generator().manual_seed(0)
    shapes = [(q + 2 * kv, h), (h, q), (2 * c["inter"], h), (h, c["inter"]), (c["vocab"], h)]
    out = {}
    for n, k in shapes:
        lin = Linear(_matrix(n, k, fmt, gen))
        out[lin.shape_key()] = lin
    return out


def llama_model(fmt: str) -> Any:
    """The whole 1.1B model as a ``LoadedModel`` (random weights), with the embedded tokenizer."""
    from flashdecode.models.loader import load_model
    from flashdecode.models.spec import ModelSpec, family_for
    from flashdecode.models.weights import LoadedModel

    c = LLAMA_1B
    spec = ModelSpec(
        family=family_for("llama"),
        vocab_size=c["vocab"],
        hidden_size=c["hidden"],
        num_layers=c["layers"],
        num_heads=c["heads"],
        num_kv_heads=c["kv_heads"],
        head_dim=c["head_dim"],
        intermediate_size=c["inter"],
        norm_eps=1e-5,
        rope_theta=10000.0,
        max_position=2048,
        tie_embeddings=False,
        bos_token_id=1,
        eos_token_ids=(2,),
    )
    loaded = LoadedModel(spec=spec, weights={}, tokenizer=load_model(None).tokenizer, source=f"llama1b-{fmt}")
    gen = torch.Generator().manual_seed(1)
    for name, shape in loaded.expected_shapes().items():
        if name not in spec.weight_names() and name != "lm_head":
            continue
        if len(shape) == 1:
            loaded.weights[name] = torch.ones(shape)
        else:
            loaded.weights[name] = _matrix(*shape, fmt, gen)
        loaded.formats[name] = fmt if len(shape) == 2 else "F32"
    loaded.validate()
    return loaded


# --- part 1: shapes ------------------------------------------------------------------------------------


def bench_shape(
    lin: Linear, grid: tuple[int, ...], allow_approx: bool, budget_s: float, min_reps: int, cap_s: float,
    rotate_bytes: int,
) -> dict[str, Any]:  # fmt: skip
    names = lin.candidates(allow_approx=allow_approx)
    runner = tuner.ColdRunner(lin, rotate_bytes)
    fns = {n: runner.fn(n) for n in names}
    xs = torch.randn(max(grid), lin.in_features, generator=torch.Generator().manual_seed(0))
    xs = xs.to(lin.compute_dtype)
    times: dict[str, dict[int, float]] = {n: {} for n in names}
    extrapolated: dict[str, list[int]] = {n: [] for n in names}
    capped: set[str] = set()
    prev = None
    with torch.inference_mode():
        for m in grid:
            live = [n for n in names if n not in capped]
            got = tuner.measure(
                {n: fns[n] for n in live}, xs[:m], min_reps=min_reps, budget_s=budget_s, drop_after=math.inf
            )
            for n in names:
                if n in got:
                    times[n][m] = got[n]
                    if got[n] > cap_s:
                        capped.add(n)
                else:
                    times[n][m] = times[n][prev] * m / prev
                    extrapolated[n].append(m)
            prev = m
        result = tuner.tune_linear(
            lin,
            allow_approx=allow_approx,
            m_grid=grid,
            budget_s=budget_s,
            min_reps=min_reps,
            rotate_bytes=rotate_bytes,
            refine=len(grid) > 3,
        )
    return {"times": times, "extrapolated": extrapolated, "plan": result.plan, "result": result}


def plan_at(plan: list[tuple[int, str]], m: int) -> str:
    name = plan[0][1]
    for start, cand in plan:
        if m >= start:
            name = cand
    return name


def speedups(shapes: dict[str, dict[str, Any]], grid: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """Geometric mean of t_static / t_table over every (shape, M) the static choice can run."""
    statics = sorted({n for r in shapes.values() for n in r["times"]})
    out = {}
    for name in statics:
        logs = []
        for r in shapes.values():
            if name not in r["times"]:
                continue
            for m in grid:
                logs.append(math.log(r["times"][name][m] / r["times"][plan_at(r["plan"], m)][m]))
        out[name] = {"speedup": math.exp(statistics.fmean(logs)), "points": len(logs)}
    return out


def format_shapes(model: str, shapes: dict[str, dict[str, Any]], grid: tuple[int, ...]) -> str:
    lines = [
        f"\n== {model}: median us per call (cold weights); * = the tuned table's choice, ~ = extrapolated"
    ]
    for key, r in shapes.items():
        names = list(r["times"])
        lines.append(f"{key}   table: {format_plan(r['plan'])}")
        lines.append("     M " + "".join(f"{n:>15}" for n in names))
        for m in grid:
            choice = plan_at(r["plan"], m)
            cells = []
            for n in names:
                mark = ("*" if n == choice else "") + ("~" if m in r["extrapolated"][n] else "")
                cells.append(f"{mark}{r['times'][n][m] * 1e6:.0f}".rjust(15))
            lines.append(f"{m:>6} " + "".join(cells))
    sp = speedups(shapes, grid)
    best = max((v["speedup"] for v in sp.values()), default=1.0)
    lines.append("speedup of the tuned table over each static choice (geometric mean over shapes x M):")
    for name, v in sorted(sp.items(), key=lambda kv: kv[1]["speedup"]):
        lines.append(f"  {name:>16}: {v['speedup']:6.2f}x over {v['points']} points")
    best_static = min(sp.items(), key=lambda kv: kv[1]["speedup"]) if sp else ("-", {"speedup": best})
    lines.append(f"  best static choice: {best_static[0]} ({best_static[1]['speedup']:.2f}x; goal >= 1.2x)")
    return "\n".join(lines)


def plot(all_shapes: dict[str, dict[str, dict[str, Any]]], grid: tuple[int, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(model, key, r) for model, shapes in all_shapes.items() for key, r in shapes.items()]
    cols = 5
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, (model, key, r) in zip(axes.flat, panels):
        for name, ts in r["times"].items():
            ms = sorted(ts)
            ax.plot(ms, [ts[m] * 1e6 for m in ms], marker="o", ms=3, label=name)
        for start, name in r["plan"][1:]:  # the crossovers: the table switches to `name` at M = start
            ax.axvline(start, color="k", ls="--", lw=0.8)
            ax.annotate(f"{name} from M={start}", (start, 0.02), xycoords=("data", "axes fraction"),
                        rotation=90, fontsize=6, va="bottom")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{model}\n{key}", fontsize=8)
        ax.set_xlabel("M")
        ax.set_ylabel("us")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- part 2: end to end ----------------------------------------------------------------------------------


def weight_bytes_per_step(model: Any) -> int:
    """Bytes of every projection weight (what one decode step reads once, whatever the batch)."""
    return sum(tuner.weight_bytes(lin) for lin in iter_linears(model.linears()))


def decode_rate(engine: Any, batch: int, prompt_len: int, gen: int, seed: int = 0) -> float:
    """Decode tokens/s: time from every request having its first token to all finished."""
    from flashdecode.sampling_params import SamplingParams

    gen_ids = torch.Generator().manual_seed(seed)
    vocab = engine.spec.vocab_size
    params = SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True)
    ids = [f"bench-{seed}-{i}" for i in range(batch)]
    for rid in ids:
        prompt = torch.randint(3, min(vocab, 30000), (prompt_len,), generator=gen_ids).tolist()
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    produced = {rid: 0 for rid in ids}
    start = None
    tokens_at_start = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            produced[out.request_id] = len(out.outputs[0].token_ids)
        if start is None and all(v >= 1 for v in produced.values()):
            start, tokens_at_start = time.perf_counter(), sum(produced.values())
    elapsed = time.perf_counter() - (start or time.perf_counter())
    return (sum(produced.values()) - tokens_at_start) / elapsed if elapsed > 0 else float("nan")


def e2e(name: str, loaded: Any, table: DataflowTable, threads: int, batches: tuple[int, ...],
        gen: int, prompt_len: int, bandwidth: float, reps: int) -> list[dict[str, Any]]:  # fmt: skip
    """Decode tokens/s per dataflow mode and batch: the three engines built once, then ``reps`` rounds
    that run every mode in turn, so drift and bursts of load hit them alike; medians reported."""
    from flashdecode.config import EngineConfig
    from flashdecode.engine.llm_engine import LLMEngine

    modes = ("table", "default", "off")
    engines = {}
    no_table = DataflowTable(fingerprint={})  # every shape on the default plan
    for mode in modes:
        config = EngineConfig(
            dataflow="off" if mode == "off" else "auto",
            num_threads=threads,
            max_model_len=prompt_len + gen + 8,
            max_num_seqs=max(batches),
            kv_cache_bytes=None,
        )
        engines[mode] = LLMEngine(config, loaded=loaded, table=table if mode == "table" else no_table)
        decode_rate(engines[mode], 1, 4, 3, seed=99)  # warm-up
    rates: dict[tuple[str, int], list[float]] = {(m, b): [] for m in modes for b in batches}
    for rep in range(reps):
        for b in batches:
            for mode in modes:
                rates[mode, b].append(decode_rate(engines[mode], b, prompt_len, gen, seed=rep))
    rows = []
    for (mode, b), got in rates.items():
        step_bytes = weight_bytes_per_step(engines[mode].model)
        rate = statistics.median(got)
        rows.append(
            {
                "model": name,
                "dataflow": mode,
                "batch": b,
                "tokens_per_s": rate,
                "tokens_per_s_runs": got,
                "weight_bytes_per_step": step_bytes,
                "weight_bytes_per_token": step_bytes / b,
                "bandwidth_fraction": rate / b * step_bytes / bandwidth,
            }
        )
    return rows


def format_e2e(rows: list[dict[str, Any]], bandwidth: float) -> str:
    lines = [f"\n== end to end decode (memory bandwidth measured here: {bandwidth / 1e9:.1f} GB/s)"]
    lines.append(
        f"{'model':>14} {'dataflow':>8} {'batch':>5} {'tok/s':>8} {'(min-max)':>13} {'MB/step':>8} "
        f"{'MB/token':>9} {'of BW':>6}"
    )
    for r in rows:
        runs = r.get("tokens_per_s_runs") or [r["tokens_per_s"]]
        spread = f"({min(runs):.1f}-{max(runs):.1f})"
        lines.append(
            f"{r['model']:>14} {r['dataflow']:>8} {r['batch']:>5} {r['tokens_per_s']:8.1f} {spread:>13} "
            f"{r['weight_bytes_per_step'] / 1e6:8.1f} {r['weight_bytes_per_token'] / 1e6:9.1f} "
            f"{r['bandwidth_fraction'] * 100:5.0f}%"
        )
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 repetition (CI)")
    p.add_argument("--out-dir", default="benchmarks/results/dataflow", help="JSON report and plot")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--allow-approx", action="store_true", help="also the kernels that round to bf16")
    p.add_argument("--models", default=None, help="comma list of smollm2, llama1b-q4_0, llama1b-bf16")
    p.add_argument("--grid", default=None, help="comma list of M (default: 1,2,4,...,512; --quick: 1,8,64)")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end decode part")
    p.add_argument(
        "--cap", type=float, default=None, help="seconds per call above which a kernel is extrapolated"
    )
    args = p.parse_args(argv)

    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cpu_kernels.load() is None:
        print("warning: no native kernels; only torch candidates are measured", file=sys.stderr)
    quick = args.quick
    grid = (1, 8, 64) if quick else tuner.M_GRID
    if args.grid:
        grid = tuple(sorted({int(m) for m in args.grid.split(",")}))
    models = (
        args.models.split(",")
        if args.models
        else (["smollm2"] if quick else ["smollm2", "llama1b-q4_0", "llama1b-bf16"])
    )
    cap = args.cap if args.cap is not None else (0.2 if quick else 2.0)
    budget, reps = (0.0, 1) if quick else (0.3, 5)
    rotate = (4 << 20) if quick else 2 * last_level_cache_bytes()

    report: dict[str, Any] = {"fingerprint": fingerprint(threads), "grid": list(grid), "models": {}}
    all_shapes: dict[str, dict[str, dict[str, Any]]] = {}
    tables: dict[str, DataflowTable] = {}
    for model in models:
        if model == "smollm2":
            lins = embedded_linears()
        elif model.startswith("llama1b-"):
            fmt = {"q4_0": "Q4_0", "bf16": "BF16"}[model.split("-", 1)[1]]
            lins = llama_shapes(fmt)
        else:
            print(f"unknown model {model!r}", file=sys.stderr)
            return 2
        shapes = {}
        for key, lin in lins.items():
            t0 = time.perf_counter()
            shapes[key] = bench_shape(lin, grid, args.allow_approx, budget, reps, cap, rotate)
            print(f"  {model} {key}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        all_shapes[model] = shapes
        tables[model] = DataflowTable(
            fingerprint=fingerprint(threads), shapes={k: r["result"] for k, r in shapes.items()}
        )
        print(format_shapes(model, shapes, grid))
        report["models"][model] = {
            "shapes": {
                k: {"times": r["times"], "extrapolated": r["extrapolated"], "plan": r["plan"]}
                for k, r in shapes.items()
            },
            "speedups": speedups(shapes, grid),
        }
    plot(all_shapes, grid, out_dir / "dataflow.png")

    if not args.no_e2e:
        bandwidth = measure_memory_bandwidth(threads, nbytes=(64 << 20) if quick else (512 << 20))
        rows = []
        gen, prompt_len, e2e_reps = (4, 8, 1) if quick else (64, 64, 3)
        batches = (1, 8) if not quick else (1, 2)
        for model in models:
            if model == "smollm2":
                from flashdecode.models.loader import load_model

                loaded = load_model(None)
            else:
                loaded = llama_model({"q4_0": "Q4_0", "bf16": "BF16"}[model.split("-", 1)[1]])
            rows += e2e(model, loaded, tables[model], threads, batches, gen, prompt_len, bandwidth, e2e_reps)
            del loaded
        print(format_e2e(rows, bandwidth))
        report["e2e"] = rows
        report["bandwidth"] = bandwidth
    (out_dir / "dataflow.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"\nreport: {out_dir / 'dataflow.json'}, plot: {out_dir / 'dataflow.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
