"""Where a decode step's time goes: cProfile over steady-state decode steps of one request.

    python benchmarks/profile_decode.py [--model PATH] [--steps 100] [--temperature 1.0] [--top 14]

Profiling slows Python-heavy code, so read the shares, not the absolute time (``flashdecode bench``
measures that).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from flashdecode import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top", type=int, default=14)
    args = p.parse_args()
    engine = LLM(model=args.model, max_model_len=args.steps + 64).engine
    params = SamplingParams(max_tokens=args.steps + 2, ignore_eos=True, temperature=args.temperature)
    engine.add_request("warm-up", "Once upon a time", SamplingParams(max_tokens=8, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    engine.add_request("profiled", "Once upon a time", params)
    engine.step()  # the prefill
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    for _ in range(args.steps):
        engine.step()
    profile.disable()
    print(f"{(time.perf_counter() - start) / args.steps * 1e3:.2f} ms per decode step under the profiler")
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
