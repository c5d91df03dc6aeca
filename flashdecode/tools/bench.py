"""``flashdecode bench``: offline prefill and decode throughput and latency through the engine, each
figure beside the roofline bound of this machine (``hardware/roofline.py``).

One cell per (batch, prompt length): ``batch`` requests of ``prompt_len`` random token ids each,
``gen_len`` greedy tokens each (EOS ignored), all added at once and driven with ``LLMEngine.step()``.
Steps taken before every request has its first token are the prefill phase (prefill tokens/s = prompt
tokens / that time; time to first token per request); the steps after it are the decode phase (decode
tokens/s = tokens generated / that time; the inter-token latency is one decode step). Whatever the
engine does inside a step (kernels, sampling, detokenization) is measured as it is at run time.

The roofline bound of a cell uses the memory bandwidth measured in this process (it can differ from
process to process) and the cached matmul ceilings; decode is bounded at the cell's mean context
(``prompt_len + gen_len / 2``: a step's bytes grow linearly with context).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from ..entrypoints.cli import add_parallel_args, add_speculative_arg
from ..entrypoints.llm import LLM
from ..errors import FlashDecodeError
from ..kernels.cpu.decode import DecodeStep
from ..models.loader import resolve_model_path
from ..sampling_params import SamplingParams
from ..utils.cpuinfo import cpu_model, peak_rss_bytes, physical_cores, reset_peak_rss, rss_bytes
from ..utils.formatting import fmt_bytes, format_table, parse_int_list
from ..utils.paths import write_report
from .roofline import Ceilings, machine_ceilings, model_cost_for_engine


@dataclass
class BenchConfig:
    model: str | None = None
    batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    prompt_lens: list[int] = field(default_factory=lambda: [128, 512])
    gen_len: int = 128
    reps: int = 1
    num_threads: int | None = None
    dtype: str = "auto"
    seed: int = 0
    max_num_batched_tokens: int | None = None
    engine_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.batches = parse_int_list(self.batches, "--batch")
        self.prompt_lens = parse_int_list(self.prompt_lens, "--prompt-len")
        (self.gen_len,) = parse_int_list(self.gen_len, "--gen-len")
        (self.reps,) = parse_int_list(self.reps, "--reps")
        if self.gen_len < 2:
            raise FlashDecodeError("--gen-len must be at least 2 (one prefill token, then decode steps)")
        if self.num_threads is not None:
            parse_int_list(self.num_threads, "--threads")


@dataclass
class CellRun:
    """One run of one cell: the raw timings."""

    batch: int
    prompt_len: int
    gen_len: int
    prefill_s: float
    prefill_tokens: int
    ttft_s: list[float]
    decode_s: float
    decode_tokens: int
    decode_steps: list[tuple[int, float]]  # (sequences in the step, seconds)
    total_s: float

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def itl_s(self) -> float:
        """Median time of the decode steps that ran the full batch (all steps if none did); with
        speculative decoding a full step may emit more tokens than the batch has sequences."""
        full = [t for n, t in self.decode_steps if n >= self.batch] or [t for _, t in self.decode_steps]
        return statistics.median(full) if full else float("nan")


def _random_prompts(vocab: int, batch: int, prompt_len: int, rng: random.Random, avoid: set[int]) -> list:
    prompts = []
    for _ in range(batch):
        ids = []
        while len(ids) < prompt_len:
            t = rng.randrange(vocab)
            if t not in avoid:
                ids.append(t)
        prompts.append({"prompt_token_ids": ids})
    return prompts


def run_cell(
    engine: Any, batch: int, prompt_len: int, gen_len: int, rng: random.Random, on_tokens: Any = None
) -> CellRun:
    """Run one cell through ``engine`` (an ``LLMEngine`` with no other requests)."""
    avoid = set(engine.eos_token_ids) | {engine.spec.bos_token_id}
    params = SamplingParams(temperature=0.0, max_tokens=gen_len, min_tokens=gen_len, ignore_eos=True)
    prompts = _random_prompts(engine.spec.vocab_size, batch, prompt_len, rng, avoid)
    tag = f"bench-{rng.getrandbits(40):x}"
    ids = [f"{tag}-{i}" for i in range(batch)]
    produced = dict.fromkeys(ids, 0)
    first_token: dict[str, float] = {}
    start = time.perf_counter()
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, prompt, params)
    prefill_s = decode_s = 0.0
    decode_tokens = 0
    decode_steps: list[tuple[int, float]] = []
    while engine.has_unfinished_requests():
        in_prefill = len(first_token) < batch
        t0 = time.perf_counter()
        outputs = engine.step()
        t1 = time.perf_counter()
        new = prompts_done = 0
        for out in outputs:
            if out.request_id not in produced:
                continue
            n = len(out.outputs[0].token_ids)
            new += n - produced[out.request_id]
            produced[out.request_id] = n
            if n and out.request_id not in first_token:
                first_token[out.request_id] = t1 - start
                prompts_done += 1
        if in_prefill:
            prefill_s += t1 - t0
        else:
            decode_s += t1 - t0
            decode_tokens += new
            decode_steps.append((new, t1 - t0))
        if on_tokens is not None:
            on_tokens(new + prompts_done * prompt_len)
    total = time.perf_counter() - start
    return CellRun(
        batch=batch,
        prompt_len=prompt_len,
        gen_len=gen_len,
        prefill_s=prefill_s,
        prefill_tokens=batch * prompt_len,
        ttft_s=[first_token.get(i, float("nan")) for i in ids],
        decode_s=decode_s,
        decode_tokens=decode_tokens,
        decode_steps=decode_steps,
        total_s=total,
    )


def _median_range(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize_cell(runs: list[CellRun], cost: Any, ceilings: Any, compute: str) -> dict[str, Any]:
    """Medians (with min-max) over repetitions, and each throughput as a fraction of its bound."""
    first = runs[0]
    b, p, g = first.batch, first.prompt_len, first.gen_len
    prefill_bound = cost.prefill(p, batch=b).tokens_per_s(ceilings, compute)
    # the decode steps attend to p + 1, ..., p + g - 1 keys: p + g / 2 on average
    decode_bound = cost.decode_step(b, p + g // 2).tokens_per_s(ceilings, compute)
    prefill = _median_range([r.prefill_tok_s for r in runs])
    decode = _median_range([r.decode_tok_s for r in runs])
    return {
        "batch": b,
        "prompt_len": p,
        "gen_len": g,
        "reps": len(runs),
        "prefill_tok_s": prefill,
        "prefill_bound_tok_s": prefill_bound,
        "prefill_fraction": prefill["median"] / prefill_bound,
        "ttft_ms": _median_range([1e3 * statistics.mean(r.ttft_s) for r in runs]),
        "decode_tok_s": decode,
        "decode_bound_tok_s": decode_bound,
        "decode_fraction": decode["median"] / decode_bound,
        "itl_ms": _median_range([1e3 * r.itl_s for r in runs]),
        "total_s": _median_range([r.total_s for r in runs]),
        "runs": [asdict(r) for r in runs],
    }


def make_engine(config: BenchConfig) -> Any:
    longest = max(config.prompt_lens) + config.gen_len + 1
    options: dict[str, Any] = {
        "max_model_len": longest,
        "max_num_seqs": max(config.batches),
        "enable_prefix_caching": False,  # every prompt is fresh anyway; no hashing cost either
        "num_threads": config.num_threads,
        **config.engine_options,
    }
    if config.max_num_batched_tokens is not None:
        options["max_num_batched_tokens"] = config.max_num_batched_tokens
    return LLM(model=config.model, dtype=config.dtype, seed=config.seed, **options).engine


def run_bench(
    config: BenchConfig, progress: bool = True, engine: Any = None, ceilings: Any = None
) -> dict[str, Any]:
    """Every cell of ``config`` (interleaved over repetitions); returns the JSON-able result."""

    # a missing model fails here, before any probe
    file_bytes = model_file_bytes(config.model if engine is None else engine.config.model)
    if ceilings is None:  # before the engine: the bandwidth probe's buffer is not the engine's memory
        ceilings = machine_ceilings(config.num_threads or physical_cores(), fresh_bandwidth=True)
    peak_since_load = reset_peak_rss()
    baseline = rss_bytes()  # the interpreter, torch and flashdecode: no part of the model's memory
    load_start = time.perf_counter()
    engine = engine if engine is not None else make_engine(config)
    load_s = time.perf_counter() - load_start
    threads = torch.get_num_threads()
    cost = model_cost_for_engine(engine)
    compute = cost.compute_dtype()
    rng = random.Random(config.seed)

    run_cell(engine, 1, min(8, max(config.prompt_lens)), 2, rng)  # warm-up: first-call costs
    cells = [(b, p) for b in config.batches for p in config.prompt_lens]
    total = config.reps * sum(b * (p + config.gen_len) for b, p in cells)
    bar = None
    if progress:
        bar = tqdm(total=total, unit="tok", desc="flashdecode bench", file=sys.stderr, dynamic_ncols=True)
    runs: dict[tuple[int, int], list[CellRun]] = {cell: [] for cell in cells}
    try:
        for _ in range(config.reps):
            for b, p in cells:
                if bar is not None:
                    bar.set_postfix_str(f"batch {b}, prompt {p}")
                runs[(b, p)].append(
                    run_cell(engine, b, p, config.gen_len, rng, bar.update if bar is not None else None)
                )
    finally:
        if bar is not None:
            bar.close()
    memory = memory_summary(engine, file_bytes, peak_rss_bytes(), peak_since_load, baseline)
    return {
        "model": {
            "source": engine.config.model or "embedded SmolLM2-135M-Instruct Q4_1",
            "architecture": engine.spec.family.name,
            "parameters": engine.spec.num_parameters(),
            "stored_formats": cost.stored_format_summary(),
            "weight_bytes_per_step": cost.resident_weight_bytes(),
            "kv_bytes_per_token": cost.kv_bytes_per_token,
        },
        "engine": {
            "dtype": str(engine.dtype).removeprefix("torch."),
            "int8_activations": engine.numerics.int8_activations,
            "kv_cache_dtype": str(engine.cache.kv.dtype).removeprefix("torch."),
            "threads": threads,
            "load_s": load_s,
            "resident_weight_bytes": resident_tensor_bytes(engine.model),
            "speculative": _speculative_summary(engine),
        },
        "memory": memory,
        "machine": {"cpu": cpu_model(), "physical_cores": physical_cores()},
        "ceilings": ceilings.to_json(),
        "compute": compute,
        "config": {k: v for k, v in asdict(config).items() if k != "engine_options"},
        "cells": [summarize_cell(runs[cell], cost, ceilings, compute) for cell in cells],
    }


def _speculative_summary(engine: Any) -> dict[str, Any] | None:
    """The speculative config and what its drafts did over the whole run (None when off)."""
    spec = engine.config.speculative
    if spec is None:
        return None
    s = engine.stats()
    return {
        **asdict(spec),
        "num_drafts": s.spec_num_drafts,
        "num_draft_tokens": s.spec_num_draft_tokens,
        "num_accepted_tokens": s.spec_num_accepted_tokens,
        "acceptance_rate": s.spec_acceptance_rate,
        "mean_accepted_length": s.spec_mean_accepted_length,
    }


def model_file_bytes(model: str | None) -> int:
    """Bytes of the model's weight files: the GGUF file, or a folder's safetensors files."""
    path = resolve_model_path(model)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def memory_summary(
    engine: Any, file_bytes: int, peak_rss: int, since_load: bool, baseline: int | None = None
) -> dict[str, Any]:
    """The process's peak RSS beside what it must hold: the weight files (``file_bytes``) and the KV
    cache's storage (issue 15's ratio). ``since_load``: the peak counts from just before the engine
    was built (else from the process's start, the bandwidth probe's buffer too). ``baseline``: the
    RSS just before the engine was built (the interpreter, torch, flashdecode's modules), which the
    peak includes; the peak above it is what serving the model added."""
    cache = engine.cache
    kv_bytes = cache.bytes_per_slot * cache.kv.shape[1]
    held = file_bytes + kv_bytes
    if baseline is not None:  # the kernel's RSS counters lag (per-CPU caches): a small peak can read
        peak_rss = max(peak_rss, baseline)  # a few pages under the RSS read before it
    summary = {
        "peak_rss_bytes": peak_rss,
        "peak_rss_from": "engine load" if since_load else "process start",
        "model_file_bytes": file_bytes,
        "kv_cache_bytes": kv_bytes,
        "peak_rss_ratio": peak_rss / held,
    }
    if baseline is not None:
        summary |= {
            "baseline_rss_bytes": baseline,
            "peak_rss_over_baseline_bytes": peak_rss - baseline,
            "peak_rss_over_baseline_ratio": (peak_rss - baseline) / held,
        }
    return summary


def resident_tensor_bytes(obj: Any, _seen: set[int] | None = None, _depth: int = 0) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj`` (the weights as the engine holds
    them now, whatever their format), following attributes, lists and dicts."""
    seen = _seen if _seen is not None else set()
    if _depth > 6 or id(obj) in seen or isinstance(obj, DecodeStep):  # a step: views, and the KV cache
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = storage.data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, dict):
        children: Any = obj.values()
    elif isinstance(obj, (list, tuple)):
        children = obj
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        children = vars(obj).values()
    else:
        return 0
    return sum(resident_tensor_bytes(c, seen, _depth + 1) for c in children)


def _fraction(x: float) -> str:
    return f"{100 * x:.0f}%" if x >= 0.1 else f"{100 * x:.1f}%"


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def format_bench_table(result: dict[str, Any]) -> str:
    rows = []
    for c in result["cells"]:
        spread = (
            "" if c["reps"] == 1 else f" ({_num(c['decode_tok_s']['min'])}-{_num(c['decode_tok_s']['max'])})"
        )
        rows.append(
            [
                str(c["batch"]),
                str(c["prompt_len"]),
                str(c["gen_len"]),
                _num(c["prefill_tok_s"]["median"]),
                f"{_fraction(c['prefill_fraction'])} of {_num(c['prefill_bound_tok_s'])}",
                _num(c["ttft_ms"]["median"]),
                _num(c["decode_tok_s"]["median"]) + spread,
                f"{_fraction(c['decode_fraction'])} of {_num(c['decode_bound_tok_s'])}",
                f"{c['itl_ms']['median']:.1f}",
            ]
        )
    headers = ["batch", "prompt", "gen", "prefill tok/s", "roofline", "TTFT ms", "decode tok/s", "roofline"]
    return format_table(headers + ["ITL ms"], rows)


def describe_result(result: dict[str, Any]) -> str:
    m, e, c, mem = result["model"], result["engine"], result["ceilings"], result["memory"]
    peak = Ceilings(**c).peak(result["compute"]) / 1e9
    return (
        f"model: {m['source']} ({m['architecture']}, {m['parameters']:,} parameters; "
        f"stored {m['stored_formats']})\n"
        f"engine: compute {e['dtype']}, {e['threads']} threads, loaded in {e['load_s']:.1f} s, "
        f"holds {fmt_bytes(e['resident_weight_bytes'])} of tensors; stored weights read per step "
        f"{fmt_bytes(m['weight_bytes_per_step'])}\n"
        f"memory: peak RSS {fmt_bytes(mem['peak_rss_bytes'])} (from {mem['peak_rss_from']}) = "
        f"{mem['peak_rss_ratio']:.2f}x (model file {fmt_bytes(mem['model_file_bytes'])} + KV cache "
        f"{fmt_bytes(mem['kv_cache_bytes'])}){_over_baseline(mem)}\n"
        f"machine: {result['machine']['cpu']}; memory bandwidth {c['bandwidth'] / 1e9:.1f} GB/s measured in "
        f"this process; matmul ceiling {result['compute']} {peak:,.0f} GFLOP/s"
    )


def _over_baseline(mem: dict[str, Any]) -> str:
    if "baseline_rss_bytes" not in mem:
        return ""
    return (
        f"; {fmt_bytes(mem['peak_rss_over_baseline_bytes'])} above the "
        f"{fmt_bytes(mem['baseline_rss_bytes'])} of interpreter and torch before the engine = "
        f"{mem['peak_rss_over_baseline_ratio']:.2f}x"
    )


# --- command line ------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file or Hugging Face folder (default: embedded)")
    p.add_argument("--batch", default="1,8,32", help="batch sizes, comma-separated (default 1,8,32)")
    p.add_argument("--prompt-len", default="128,512", help="prompt lengths in tokens (default 128,512)")
    p.add_argument("--gen-len", default="128", help="tokens generated per request (default 128)")
    p.add_argument("--reps", default="1", help="repetitions of every cell; medians are reported")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto, float32, bfloat16")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="engine token budget per step")
    p.add_argument("--seed", type=int, default=0)
    add_speculative_arg(p)
    add_parallel_args(p)
    p.add_argument("--json", default=None, metavar="FILE", help="write every figure and raw timing here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    config = BenchConfig(
        model=args.model,
        batches=args.batch,
        prompt_lens=args.prompt_len,
        gen_len=args.gen_len,
        reps=args.reps,
        num_threads=args.threads,
        dtype=args.dtype,
        seed=args.seed,
        max_num_batched_tokens=args.max_num_batched_tokens,
        engine_options={
            "speculative": args.speculative,
            "tensor_parallel_size": args.tensor_parallel_size,
            "pipeline_parallel_size": args.pipeline_parallel_size,
        },
    )
    result = run_bench(config, progress=not args.no_progress)
    result["command"] = "flashdecode " + " ".join(sys.argv[1:]) if sys.argv else ""
    print(describe_result(result))
    print()
    print(format_bench_table(result))
    if args.json:
        write_report(args.json, result)
        print(f"\nwrote {args.json}")
    return 0
