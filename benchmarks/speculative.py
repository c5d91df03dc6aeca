"""Decode speed with and without speculative decoding (n-gram prompt lookup, a draft model), batch 1.

Input-grounded tasks (summarise a passage, edit a code file, answer from a passage) copy spans of
their prompt, which prompt lookup drafts; open-ended prompts give it little to draft, where the
adaptive draft length must keep speculation from slowing decoding down. ``--draft PATH`` adds an engine
drafting with that model (sharing the target's tokenizer). All engines run the same greedy requests
(outputs are compared: speculation must not change them), interleaved, each task ``--repeats`` times;
medians reported.

``--llama-cpp DIR`` also runs llama.cpp's own ``llama-lookup`` (prompt lookup) and, with ``--draft``,
``llama-speculative`` from DIR (a llama.cpp ``build/bin``) on the same GGUF files and prompts, greedy,
with the same draft length, token count and threads, and reports the decode speed and acceptance
they print.

    python benchmarks/speculative.py [--model PATH] [--draft PATH] [--llama-cpp DIR] [--max-tokens 192]
        [--repeats 3] [--k 8] [--draft-row-cost C] [--quick]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import tempfile
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

from flashdecode import LLM, SamplingParams
from flashdecode.models.loader import resolve_model_path
from flashdecode.utils.cpuinfo import physical_cores

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


def llama_cpp(
    tool: Path, model: Path, prompt: str, args: argparse.Namespace, extra: list[str]
) -> dict[str, float]:
    """One greedy run of llama.cpp's ``tool`` (llama-lookup or llama-speculative): the decode speed
    and the drafted and accepted tokens it prints."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write(prompt)
        f.flush()
        cmd = [str(tool), "-m", str(model), "-f", f.name, "-n", str(args.max_tokens), "--temp", "0"]
        cmd += ["--ignore-eos", "-c", "4096", "--spec-draft-n-max", str(args.k), "-t", str(args.threads)]
        run = subprocess.run([*cmd, *extra], capture_output=True, text=True)
    log = run.stdout + run.stderr
    speed = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s", log)
    drafted, accepted = re.search(r"n_drafted\s*=\s*(\d+)", log), re.search(r"n_accept\s*=\s*(\d+)", log)
    if run.returncode != 0 or not (speed and drafted and accepted):
        raise SystemExit(f"{' '.join(cmd + extra)} failed ({run.returncode}):\n{log[-2000:]}")
    return {
        "tok_s": float(speed[3]),
        "acceptance": int(accepted[1]) / max(int(drafted[1]), 1),
        "drafted_per_token": int(drafted[1]) / max(int(speed[1]), 1),
    }


def llama_cpp_rows(args: argparse.Namespace, prompt: str) -> dict[str, Any]:
    """llama.cpp's prompt lookup and (with --draft) draft-model speculation: medians of the repeats."""
    bin_dir, model = args.llama_cpp, resolve_model_path(args.model)
    tools = {"llama-lookup": []}
    if args.draft:
        tools["llama-speculative"] = ["-md", str(resolve_model_path(args.draft)), "-td", str(args.threads)]
    out = {}
    for tool, extra in tools.items():
        runs = [llama_cpp(bin_dir / tool, model, prompt, args, extra) for _ in range(args.repeats)]
        out[tool] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    return out


def run_task(llms: dict[str, LLM], prompt: str, params: SamplingParams, repeats: int) -> dict[str, Any]:
    """Every engine on ``prompt``, interleaved (the order turns each round; round 0 warms them up):
    median decode tok/s per engine, and the speculative ones' drafts per token and acceptance."""
    rates: dict[str, list[float]] = {label: [] for label in llms}
    counts = {label: [0, 0, 0] for label in llms}  # drafted, accepted, generated
    outputs = {}
    labels = list(llms)
    for r in range(repeats + 1):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            llm = llms[label]
            before = llm.stats()
            rate, ids = timed(llm, prompt, params)
            outputs[label] = ids
            if r == 0:
                continue
            rates[label].append(rate)
            after = llm.stats()
            counts[label][0] += after.spec_num_draft_tokens - before.spec_num_draft_tokens
            counts[label][1] += after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
            counts[label][2] += len(ids)
    for label, ids in outputs.items():
        if ids != outputs["plain"]:
            raise SystemExit(f"{label}: speculative output differs from plain decoding")
    return {
        label: {
            "tok_s": statistics.median(rates[label]),
            "acceptance": drafted and accepted / drafted,
            "drafted_per_token": drafted / generated,
        }
        for label, (drafted, accepted, generated) in counts.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--draft", default=None, help="a draft model with the target's tokenizer")
    parser.add_argument("--llama-cpp", type=Path, default=None, help="llama.cpp's build/bin, to run beside")
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=8, help="num_speculative_tokens")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--draft-row-cost",
        type=float,
        default=None,
        help="SpeculativeConfig.draft_row_cost (untuned machines)",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny run for CI: 2 tasks, 16 tokens, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.max_tokens, args.repeats = 16, 1
    args.threads = args.threads or physical_cores()

    common = dict(model=args.model, max_model_len=4096, num_threads=args.threads, enable_prefix_caching=False)
    spec: dict[str, Any] = {"num_speculative_tokens": args.k}
    if args.draft_row_cost is not None:
        spec["draft_row_cost"] = args.draft_row_cost
    llms = {
        "plain": LLM(**common),
        "ngram": LLM(**common, speculative={**spec, "method": "ngram", "prompt_lookup_max": 4}),
    }
    if args.draft:
        llms["draft"] = LLM(**common, speculative={**spec, "method": "draft", "model": args.draft})
    tok = llms["plain"].get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    rows = []
    for name, (kind, message) in tasks(args.quick).items():
        prompt = tok.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True)
        engines = run_task(llms, prompt, params, args.repeats)
        if args.llama_cpp is not None:
            engines |= llama_cpp_rows(args, prompt)
        rows.append({"task": name, "kind": kind, "engines": engines})
        base = engines["plain"]["tok_s"]
        cells = [f"plain {base:6.1f} tok/s"] + [
            f"{label} {e['tok_s']:6.1f} tok/s x{e['tok_s'] / base:4.2f} "
            f"({e['drafted_per_token']:.2f} drafted/token, {e['acceptance']:.0%} accepted)"
            for label, e in engines.items()
            if label != "plain"
        ]
        print(f"{name:20s} {kind:8s} " + "  ".join(cells), flush=True)
    if args.json:
        summary = {
            "speculative": spec,
            "max_tokens": args.max_tokens,
            "threads": args.threads,
            "draft": args.draft,
        }
        args.json.write_text(json.dumps({**summary, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
