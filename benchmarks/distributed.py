"""Tensor parallelism on one machine: 2 processes x 1 thread (T=2 over gloo) against 1 process x 2
threads, decode tokens/s at each batch, and the measured communication share of a decode step.

    python benchmarks/distributed.py [--model PATH] [--batch 1,8] [--prompt-len 64] [--gen-len 64]
        [--reps 3] [--json FILE]

Each configuration runs ``flashdecode bench``'s cells (``run_cell``: random prompts, greedy, EOS
ignored) on its own engine, one after the other (a process has one thread count). Under T=2 rank 0's
collectives are timed (``ParallelGroup.clock``): the share is their time over the decode steps' time, on
rank 0, the wait for rank 1 to reach each collective included. The model must split over 2 ranks
(its heads, KV heads, MLP and vocabulary even): the embedded model's 9 heads do not, so give one
that does (``--model``). The roofline's prediction for the same split is ``flashdecode roofline
--tensor-parallel-size 2``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]  # this checkout's flashdecode

from flashdecode.tools.bench import BenchConfig, make_engine, run_cell  # noqa: E402
from flashdecode.utils.formatting import format_table, parse_int_list  # noqa: E402

# (label, tensor_parallel_size, threads per process)
CONFIGS = [("2 processes x 1 thread (T=2)", 2, 1), ("1 process x 2 threads", 1, 2)]


def measure(engine: Any, batch: int, args: argparse.Namespace, rng: random.Random) -> dict[str, float]:
    """One cell on ``engine``: decode tokens/s and, under tensor parallelism, the decode steps' share
    spent in rank 0's collectives (the counter read after every step: the decode steps are the last)."""
    group = engine.ranks.group if engine.ranks is not None else None
    marks: list[float] = []
    if group is not None:
        group.clock.on, group.clock.seconds = True, 0.0
        marks.append(0.0)
    run = run_cell(
        engine, batch, args.prompt_len, args.gen_len, rng,
        on_tokens=None if group is None else lambda _: marks.append(group.clock.seconds),
    )  # fmt: skip
    result = {"decode_tok_s": run.decode_tok_s}
    if group is not None:
        decode_comm = marks[-1] - marks[-1 - len(run.decode_steps)]
        result["comm_share"] = decode_comm / run.decode_s
        group.clock.on = False
    return result


def run_config(tp: int, threads: int, args: argparse.Namespace) -> dict[int, list[dict[str, float]]]:
    config = BenchConfig(
        model=args.model,
        batches=args.batch,
        prompt_lens=[args.prompt_len],
        gen_len=args.gen_len,
        num_threads=threads,
        engine_options={"tensor_parallel_size": tp},
    )
    engine = make_engine(config)
    rng = random.Random(0)
    try:
        run_cell(engine, 1, args.prompt_len, 4, rng)  # warm-up: first-call costs out of the figures
        return {b: [measure(engine, b, args, rng) for _ in range(args.reps)] for b in config.batches}
    finally:
        engine.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="GGUF file or Hugging Face folder (default: embedded)")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=None, metavar="FILE")
    args = p.parse_args()
    args.batch = parse_int_list(args.batch, "--batch")
    results = {label: run_config(tp, threads, args) for label, tp, threads in CONFIGS}
    rows = []
    for label, by_batch in results.items():
        for batch, runs in by_batch.items():
            rate = statistics.median(r["decode_tok_s"] for r in runs)
            shares = [r["comm_share"] for r in runs if "comm_share" in r]
            share = f"{statistics.median(shares):.0%}" if shares else "-"
            rows.append([label, str(batch), f"{rate:.1f}", share])
    print(
        f"model {args.model or 'embedded'}, prompt {args.prompt_len}, {args.gen_len} tokens, {args.reps} reps"
    )
    print(format_table(["configuration", "batch", "decode tok/s", "comm share"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
