"""Decode speed with and without n-gram speculative decoding (prompt lookup), batch 1.

Input-grounded tasks (summarise a passage, edit a code file, answer from a passage) copy spans of
their prompt, which prompt lookup drafts; open-ended prompts give it little to draft, where the
adaptive draft length must keep speculation from slowing decoding down. Both engines run the same
greedy requests (outputs are compared: speculation must not change them), interleaved, each task
``--repeats`` times; medians reported.

    python benchmarks/speculative.py [--model PATH] [--max-tokens 192] [--repeats 3] [--k 4] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from importlib.resources import files
from pathlib import Path

from flashdecode import LLM, SamplingParams

CODE_FILE = "engine/block_manager.py"


def tasks(quick: bool) -> dict[str, tuple[str, str]]:
    """name -> (kind, user message)."""
    heldout = files("flashdecode").joinpath("data/heldout.txt").read_text()
    passage = heldout[:1200]
    code = files("flashdecode").joinpath(CODE_FILE).read_text()[:1500]
    out = {
        "summarise": ("grounded", f"Summarise this passage, quoting its key sentences:\n\n{passage}"),
        "edit code": (
            "grounded",
            f"Here is a Python file. Repeat it with every comment removed, changing nothing else:\n\n{code}",
        ),
        "quote": ("grounded", f"Repeat this passage word for word:\n\n{passage}"),
        "answer from passage": (
            "grounded",
            f"{passage}\n\nUsing the passage above, what did the speaker say the world will little note?",
        ),
        "open: story": ("open", "Write a short story about a lighthouse keeper who finds a message."),
        "open: explain": ("open", "Explain why the sky is blue to a ten-year-old."),
    }
    return dict(list(out.items())[:2]) if quick else out


def timed(llm: LLM, prompt: str, params: SamplingParams) -> tuple[float, list[int]]:
    """Decode tokens/s (the request's time less a 1-token request's, i.e. less the prefill) and the
    generated ids."""
    t0 = time.perf_counter()
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1))
    t1 = time.perf_counter()
    out = llm.generate(prompt, params)[0]
    t2 = time.perf_counter()
    ids = list(out.outputs[0].token_ids)
    return (len(ids) - 1) / max((t2 - t1) - (t1 - t0), 1e-9), ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny run for CI: 2 tasks, 16 tokens, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.max_tokens, args.repeats = 16, 1

    common = dict(model=args.model, max_model_len=4096, num_threads=args.threads, enable_prefix_caching=False)
    plain = LLM(**common)
    spec = LLM(
        **common, speculative={"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4}
    )
    tok = plain.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    rows = []
    for name, (kind, message) in tasks(args.quick).items():
        prompt = tok.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True)
        rates: dict[str, list[float]] = {"plain": [], "ngram": []}
        outputs = {}
        drafted = accepted = generated = 0
        for r in range(args.repeats + 1):  # round 0 warms both up
            for label, llm in (
                (("plain", plain), ("ngram", spec)) if r % 2 == 0 else (("ngram", spec), ("plain", plain))
            ):
                before = llm.stats()
                rate, ids = timed(llm, prompt, params)
                if r > 0:
                    rates[label].append(rate)
                outputs[label] = ids
                if label == "ngram" and r > 0:
                    after = llm.stats()
                    drafted += after.spec_num_draft_tokens - before.spec_num_draft_tokens
                    accepted += after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
                    generated += len(ids)
        if outputs["plain"] != outputs["ngram"]:
            raise SystemExit(f"{name}: speculative output differs from plain decoding")
        base, fast = statistics.median(rates["plain"]), statistics.median(rates["ngram"])
        rows.append(
            {
                "task": name,
                "kind": kind,
                "plain_tok_s": base,
                "ngram_tok_s": fast,
                "speedup": fast / base,
                "acceptance": accepted / drafted if drafted else 0.0,
                "drafted_per_token": drafted / generated,
            }
        )
        print(
            f"{name:22s} {kind:8s} plain {base:7.1f} tok/s  ngram {fast:7.1f} tok/s  "
            f"x{fast / base:4.2f}  drafted {rows[-1]['drafted_per_token']:.2f}/token, "
            f"{rows[-1]['acceptance']:.0%} accepted",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"k": args.k, "max_tokens": args.max_tokens, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
