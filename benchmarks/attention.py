"""Decode and prefill attention: FlashDecoding++'s unified-max softmax against the exact paths.

Decode (one query per sequence) reads a paged KV cache through ``KVCache.gather`` exactly as the
engine does (block size 16, blocks shuffled), at KV lengths 1K..32K, batch 1 and 8, with the head
shapes of a 1B-class model (32 query heads, 4 KV heads, head dim 64). Prefill runs a fresh causal
prompt of 512 and 2K tokens. Each repetition runs every method once, in rotating order, and the
report is the median per method; ``ratio`` is baseline / unified (> 1 means unified is faster).

  exact     the engine's exact reference (decode: head-major copies + torch softmax; prefill: SDPA)
  splitk    exact split-K with per-partition max and the synchronised rescale (decode), or the
            online-softmax key-block loop (prefill): the baseline FlashDecoding++ compares against
  softmax   exact decode with torch's fused softmax over whole rows, on the fast path's copy-free
            operands: the strongest exact competitor on a CPU (decode only)
  unified   unified max value: no max, partials simply added (the fast path)

splitk, softmax and unified share the copy-free operands (the KV gathered key-major, as
paged_attention does), so their differences are the softmax's. The gather is timed on its own
("gather"); '+gather' ratios add it to both sides, as a decode step in the engine pays it.

    python benchmarks/attention.py --quick          # tiny shapes, 1 repetition (CI)
    python benchmarks/attention.py                  # the full table (minutes; run on a quiet machine)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from flashdecode.layers.attention import (
    DECODE_PARTITION,
    WINDOW_FP32,
    decode_attention_exact,
    decode_attention_softmax,
    decode_attention_splitk,
    decode_attention_unified,
    gather_decode,
    prefill_attention_exact,
    prefill_attention_online,
    prefill_attention_unified,
)
from flashdecode.layers.kv_cache import KVCache

HEADS, KV_HEADS, HEAD_DIM = 32, 4, 64
BLOCK = 16
PHI = 3.0  # a typical calibrated value (the embedded model's range from 1 to 7); random logits are ~N(0, 1)


CLOCK = time.perf_counter


def interleaved(methods: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds per method over ``reps`` rounds; each round runs every method once, the
    starting method rotating so no method always follows the same one."""
    names = list(methods)
    for fn in methods.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            start = CLOCK()
            methods[name]()
            times[name].append(CLOCK() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def decode_case(batch: int, length: int, reps: int, gen: torch.Generator) -> dict:
    blocks_per_seq = -(-length // BLOCK)
    num_blocks = batch * blocks_per_seq
    cache = KVCache(1, num_blocks * BLOCK, KV_HEADS, HEAD_DIM, torch.float32)
    cache.k.normal_(generator=gen)
    cache.v.normal_(generator=gen)
    tables = torch.randperm(num_blocks, generator=gen).view(batch, blocks_per_seq)
    slots = (tables[:, :, None] * BLOCK + torch.arange(BLOCK)).reshape(batch, -1)[:, :length]
    lens = torch.full((batch,), length)
    lens[1::2] = length - length // 7  # ragged batch: padding rows are part of the work
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen)
    scale = HEAD_DIM**-0.5
    fallbacks = []
    # clones: a gather returns views of scratch buffers that the next gather overwrites
    k_ref, v_ref = (t.clone() for t in cache.gather(0, slots, torch.float32))  # the exact reference's layout
    k, v = (t.clone() for t in gather_decode(cache, 0, slots, torch.float32))  # the fast paths' (key-major)

    def unified():
        out, fb = decode_attention_unified(q, k, v, lens, scale, PHI, WINDOW_FP32)
        fallbacks.append(int(fb.sum()))
        return out

    methods = {
        "exact": lambda: decode_attention_exact(q, k_ref, v_ref, lens, scale),
        "splitk": lambda: decode_attention_splitk(q, k, v, lens, scale, DECODE_PARTITION),
        "softmax": lambda: decode_attention_softmax(q, k, v, lens, scale),
        "unified": unified,
        "gather": lambda: gather_decode(cache, 0, slots, torch.float32),
    }
    ref = methods["exact"]()
    for name in ("splitk", "softmax", "unified"):
        err = (methods[name]() - ref).abs().max().item()
        assert err < 1e-4, f"{name} differs from the reference by {err}"
    t = interleaved(methods, reps)
    return {"kind": "decode", "batch": batch, "kv_len": length, "ms": t, "fallback_rows": max(fallbacks)}


def prefill_case(tokens: int, reps: int, gen: torch.Generator) -> dict:
    q = torch.randn(tokens, HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=gen)
    scale = HEAD_DIM**-0.5
    fallbacks = []

    def unified():
        out, fb = prefill_attention_unified(q, k, v, scale, PHI, WINDOW_FP32)
        fallbacks.append(int(fb.sum()))
        return out

    methods = {
        "exact": lambda: prefill_attention_exact(q, k, v, scale),
        "splitk": lambda: prefill_attention_online(q, k, v, scale),
        "unified": unified,
    }
    ref = methods["exact"]()
    for name in ("splitk", "unified"):
        err = (methods[name]() - ref).abs().max().item()
        assert err < 1e-4, f"{name} differs from the reference by {err}"
    t = interleaved(methods, reps)
    return {"kind": "prefill", "batch": 1, "kv_len": tokens, "ms": t, "fallback_rows": max(fallbacks)}


def report(rows: list[dict]) -> None:
    print(
        f"{'case':<22}{'exact':>9}{'splitk':>9}{'softmax':>9}{'unified':>9}{'gather':>9}"
        f"{'splitk/unif':>13}{'+gather':>9}{'softmax/unif':>14}{'+gather':>9}{'exact/unif':>12}"
        f"{'fallbacks':>11}"
    )
    for r in rows:
        t = {k: v * 1e3 for k, v in r["ms"].items()}
        g = t.get("gather", 0.0)
        case = f"{r['kind']} B{r['batch']} L{r['kv_len']}"
        names = ("exact", "splitk", "softmax", "unified", "gather")
        cols = "".join(f"{t[m]:9.2f}" if m in t else f"{'-':>9}" for m in names)
        u = t["unified"]
        sm = f"{t['softmax'] / u:14.2f}{(t['softmax'] + g) / (u + g):9.2f}" if "softmax" in t else " " * 23
        print(
            f"{case:<22}{cols}{t['splitk'] / u:13.2f}{(t['splitk'] + g) / (u + g):9.2f}{sm}"
            f"{(t['exact'] + g) / (u + g):12.2f}{r['fallback_rows']:11d}"
        )
    print(
        "times in ms (medians); ratios are method / unified (> 1: unified is faster); '+gather' adds the "
        "KV gather every decode method pays; exact/unif includes it"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, one repetition (CI smoke test)")
    p.add_argument("--reps", type=int, default=None, help="repetitions per case (default 15; quick: 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--lengths", type=int, nargs="*", default=None, help="decode KV lengths")
    p.add_argument("--batches", type=int, nargs="*", default=None, help="decode batch sizes")
    p.add_argument("--prefill", type=int, nargs="*", default=None, help="prefill lengths")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: perf_counter; cpu: this process's CPU time (steadier on a shared machine, 1 thread)",
    )
    args = p.parse_args(argv)
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    reps = args.reps or (1 if args.quick else 15)
    lengths = args.lengths or ([64, 256] if args.quick else [1024, 4096, 16384, 32768])
    batches = args.batches or ([1, 2] if args.quick else [1, 8])
    prefills = args.prefill if args.prefill is not None else ([48] if args.quick else [512, 2048])
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for batch in batches:
            for length in lengths:
                rows.append(decode_case(batch, length, reps, gen))
                print(f"  done decode B{batch} L{length}", file=sys.stderr, flush=True)
        for tokens in prefills:
            rows.append(prefill_case(tokens, reps, gen))
            print(f"  done prefill {tokens}", file=sys.stderr, flush=True)
    print(
        f"threads {args.threads}, {reps} interleaved repetitions, {args.clock} clock, "
        f"H={HEADS} KVH={KV_HEADS} D={HEAD_DIM}"
    )
    report(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "reps": reps, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
