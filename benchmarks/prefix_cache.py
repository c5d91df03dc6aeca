"""Time to first token with and without a prefix-cache hit (issue: serving-grade engine).

A first request carries a 1,000-token prefix; a second request shares that prefix and differs after
it. With prefix caching the second request computes only its own tail, so its time to first token
should be a small fraction of the first's. Repeated with fresh prefixes; medians reported.

    python benchmarks/prefix_cache.py [--model PATH] [--prefix-len 1000] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
from importlib.resources import files

from flashdecode import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--prefix-len", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny run for CI: 64-token prefix, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.prefix_len, args.repeats = 64, 1

    llm = LLM(model=args.model, max_model_len=args.prefix_len + 64, num_threads=args.threads)
    tok = llm.get_tokenizer()
    text = files("flashdecode").joinpath("data/calibration.txt").read_text()
    text += files("flashdecode").joinpath("data/heldout.txt").read_text()
    corpus = tok.encode(text, add_special_tokens=False) * (1 + 2 * args.prefix_len // 1000)
    params = SamplingParams(temperature=0, max_tokens=1)
    llm.generate("Warm-up.", params)  # first-call costs (allocations, kernel JIT) are not the cache's
    cold, warm = [], []
    for r in range(args.repeats):
        # a fresh prefix each repeat (shifted window), so the "cold" request really is cold
        prefix = corpus[r * 7 : r * 7 + args.prefix_len]
        first = llm.generate({"prompt_token_ids": prefix + tok.encode(" First?")}, params)[0]
        second = llm.generate({"prompt_token_ids": prefix + tok.encode(" Second?")}, params)[0]
        assert second.num_cached_tokens > 0.9 * args.prefix_len, second.num_cached_tokens
        cold.append(first.metrics.time_to_first_token)
        warm.append(second.metrics.time_to_first_token)
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"prefix {args.prefix_len} tokens, {args.repeats} repeats")
    for label, times in (("without a cache hit", cold), ("with a cache hit   ", warm)):
        lo, med, hi = min(times) * 1e3, statistics.median(times) * 1e3, max(times) * 1e3
        print(f"TTFT {label}: median {med:8.1f} ms (min {lo:.1f}, max {hi:.1f})")
    print(f"ratio hit/miss: {w / c:.3f} (goal <= 0.25)")


if __name__ == "__main__":
    main()
