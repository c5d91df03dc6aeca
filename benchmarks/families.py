"""Every family flashdecode supports, as llama.cpp's own tools write it, and its decode beside llama.cpp.

    python benchmarks/families.py [--out DIR] [--only qwen2,gemma3]           # make and check the files
    python benchmarks/families.py --bench [--reps 2] [--json families.json]   # then time them

For each family, a random-weight Hugging Face model of about 0.5B parameters in the shape of the
family's small members (tests/model_factory.py builds it with transformers; MoE: a few experts, about
0.5B in all) is converted by llama.cpp's ``convert_hf_to_gguf.py --outtype f16`` (its own gguf-py on
the path) and quantized by ``llama-quantize ... Q4_K_M``, into ``--out`` (files that exist are kept;
the Hugging Face folder is removed once its F16 file exists, unless ``--keep-hf``). flashdecode then
loads each Q4_K_M file and generates a few tokens from it. With ``--bench``: decode tokens/s at batch
1, ``flashdecode bench --model Q --batch 1 --prompt-len 16 --gen-len 64`` and ``llama-bench -m Q -t 2
-p 0 -n 64``, interleaved (the order alternates every round), each in its own process; the medians,
their ratio and flashdecode's fraction of its roofline bound (as bench reports it).

The tokenizers are the ones each converter class reads (model_factory.CONVERTER_TOKENIZERS), padded by
the converter to the family's real vocabulary size. OPT is not here: llama.cpp's converter has no OPT
class (flashdecode loads OPT from Hugging Face folders only).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# this checkout's flashdecode (as ``python -m flashdecode bench`` run from ROOT gets) and its test factory
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import model_factory as mf  # noqa: E402  (tests/model_factory.py)

DEFAULT_OUT = Path("/work/models/families")
THREADS = 2
GEN_LEN = 64

# family -> (factory arch, config overrides). Shapes of each family's small members, scaled to about
# 0.5B parameters where the smallest is larger; vocabularies, head dims and GQA ratios as released.
_COMMON = dict(max_position_embeddings=4096)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    # Llama 3.2-1B's vocabulary, heads and head dim, fewer and narrower layers
    "llama": ("llama", dict(_COMMON, vocab_size=128256, hidden_size=1024, num_hidden_layers=22,
                            num_attention_heads=16, num_key_value_heads=8, head_dim=64,
                            intermediate_size=4096, tie_word_embeddings=True)),
    # Mistral-7B's vocabulary (v0.3) and 4:1 GQA with head_dim 128, narrower
    "mistral": ("mistral", dict(_COMMON, vocab_size=32768, hidden_size=1024, num_hidden_layers=28,
                                num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                                intermediate_size=4096, tie_word_embeddings=False)),
    # Qwen2.5-0.5B exactly
    "qwen2": ("qwen2", dict(_COMMON, vocab_size=151936, hidden_size=896, num_hidden_layers=24,
                            num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                            tie_word_embeddings=True)),
    # Qwen3-0.6B exactly
    "qwen3": ("qwen3", dict(_COMMON, vocab_size=151936, hidden_size=1024, num_hidden_layers=28,
                            num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                            intermediate_size=3072, tie_word_embeddings=True)),
    # Phi-3-mini's vocabulary, head_dim 96 and 4k context, narrower and fewer layers
    "phi3": ("phi3", dict(_COMMON, vocab_size=32064, hidden_size=1536, num_hidden_layers=14,
                          num_attention_heads=16, num_key_value_heads=16, intermediate_size=4096,
                          original_max_position_embeddings=4096, tie_word_embeddings=False)),
    # Gemma 2-2B's vocabulary, head_dim 256, soft-caps and window, narrower and fewer layers
    "gemma2": ("gemma2", dict(_COMMON, vocab_size=256000, hidden_size=1024, num_hidden_layers=14,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=256,
                              query_pre_attn_scalar=256, intermediate_size=4096, sliding_window=4096,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    # Gemma 3-270M/1B's vocabulary, 4:1 GQA with head_dim 256, window 512, 5 sliding : 1 global
    "gemma3": ("gemma3", dict(_COMMON, vocab_size=262144, hidden_size=1024, num_hidden_layers=14,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                              query_pre_attn_scalar=256, intermediate_size=4096, sliding_window=512,
                              rope_parameters={
                                  "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                              }, tie_word_embeddings=True)),
    # Mixtral's vocabulary, 4:1 GQA and top-2 routing, over 4 experts
    "mixtral": ("mixtral", dict(_COMMON, vocab_size=32000, hidden_size=1024, num_hidden_layers=16,
                                num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                                intermediate_size=2048, num_local_experts=4, num_experts_per_tok=2)),
    # Qwen1.5-MoE's vocabulary, shared expert and top-4 routing, over 8 experts
    "qwen2moe": ("qwen2moe", dict(_COMMON, vocab_size=151936, hidden_size=768, num_hidden_layers=16,
                                  num_attention_heads=12, num_key_value_heads=12, intermediate_size=2048,
                                  moe_intermediate_size=704, shared_expert_intermediate_size=2816,
                                  num_experts=8, num_experts_per_tok=4, tie_word_embeddings=True)),
    # Qwen3-30B-A3B's vocabulary, head_dim 128 and top-8 of many experts, here 16 experts
    "qwen3moe": ("qwen3moe", dict(_COMMON, vocab_size=151936, hidden_size=768, num_hidden_layers=16,
                                  num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                                  intermediate_size=2048, moe_intermediate_size=512, num_experts=16,
                                  num_experts_per_tok=8, tie_word_embeddings=True)),
}  # fmt: skip
NOT_CONVERTED = {"opt": "llama.cpp's convert_hf_to_gguf.py has no OPT class (Hugging Face folders only)"}


def make_files(name: str, out: Path, keep_hf: bool) -> Path:
    """The family's Q4_K_M file (and its F16 source), made unless they exist."""
    arch, overrides = FAMILIES[name]
    hf_dir, f16, q = out / f"{name}-hf", out / f"{name}-f16.gguf", out / f"{name}-q4_k_m.gguf"
    if not q.exists() and not f16.exists():
        if not (hf_dir / "generation_config.json").exists():  # make_hf_model writes it last
            print(f"{name}: building the random model in {hf_dir}", flush=True)
            tokenizer = mf.CONVERTER_TOKENIZERS.get(arch, "spm")
            mf.make_hf_model(arch, hf_dir, tokenizer=tokenizer, **overrides)
        print(f"{name}: convert_hf_to_gguf.py --outtype f16 -> {f16}", flush=True)
        tmp = f16.with_suffix(".tmp")
        mf.convert_with_llama_cpp([(hf_dir, tmp)])
        tmp.rename(f16)
    if f16.exists() and not keep_hf:
        shutil.rmtree(hf_dir, ignore_errors=True)
    if not q.exists():
        print(f"{name}: llama-quantize Q4_K_M -> {q}", flush=True)
        tmp = q.with_suffix(".tmp")
        mf.llama_quantize(f16, tmp, "Q4_K_M", THREADS)
        tmp.rename(q)
    return q


def check_loads(q: Path) -> dict[str, Any]:
    """flashdecode's reading of the file (family, features, parameters, stored formats) and a few
    greedy tokens from it."""
    from collections import Counter

    from flashdecode import LLM, SamplingParams
    from flashdecode.models.gguf_loader import describe_gguf

    spec, formats = describe_gguf(q)
    llm = LLM(model=str(q), max_model_len=64, numerics="exact", num_threads=THREADS, kv_cache_bytes=64 << 20)
    out = llm.generate({"prompt_token_ids": list(range(10, 26))}, SamplingParams(temperature=0, max_tokens=8))
    return {
        "family": spec.family.name,
        "features": spec.features(),
        "parameters": spec.num_parameters(),
        "formats": dict(Counter(formats.values())),
        "generated": out[0].outputs[0].token_ids,
    }


def bench_flashdecode(q: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "fd.json"
        cmd = [sys.executable, "-m", "flashdecode", "bench", "--model", str(q), "--batch", "1",
               "--prompt-len", "16", "--gen-len", str(GEN_LEN), "--threads", str(THREADS),
               "--no-progress", "--json", str(report)]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        cell = json.loads(report.read_text())["cells"][0]
    return {"tok_s": cell["decode_tok_s"]["median"], "fraction": cell["decode_fraction"]}


def bench_llama_cpp(q: Path) -> float | str:
    """llama-bench's decode tok/s, or why it gave none (its last error line)."""
    root = mf.llama_cpp_dir()
    assert root is not None
    cmd = [str(root / "build/bin/llama-bench"), "-m", str(q), "-t", str(THREADS), "-p", "0",
           "-n", str(GEN_LEN), "-r", "1", "-o", "json"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        errors = [line for line in run.stderr.splitlines() if "error" in line] or [f"exit {run.returncode}"]
        return errors[0].strip()
    return float(json.loads(run.stdout)[0]["avg_ts"])


def bench(q: Path, reps: int) -> dict[str, Any]:
    """Decode tok/s at batch 1 for both engines, interleaved over ``reps`` rounds."""
    fd: list[dict[str, float]] = []
    lc: list[float | str] = []
    for r in range(reps):
        order = ("fd", "lc") if r % 2 == 0 else ("lc", "fd")
        for engine in order:
            if engine == "fd":
                fd.append(bench_flashdecode(q))
            else:
                lc.append(bench_llama_cpp(q))
    fd_tok_s = statistics.median(x["tok_s"] for x in fd)
    timed = [x for x in lc if isinstance(x, float)]
    lc_tok_s = statistics.median(timed) if timed else None
    return {
        "flashdecode_tok_s": fd_tok_s,
        "llama_cpp_tok_s": lc_tok_s,
        "llama_cpp_error": None if timed else lc[0],
        "ratio": None if lc_tok_s is None else fd_tok_s / lc_tok_s,
        "fraction_of_roofline": statistics.median(x["fraction"] for x in fd),
        "runs": {"flashdecode": fd, "llama.cpp": lc},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"model directory (default {DEFAULT_OUT})")
    p.add_argument("--only", default=",".join(FAMILIES), help="families, comma-separated (default: all)")
    p.add_argument("--keep-hf", action="store_true", help="keep each Hugging Face folder after conversion")
    p.add_argument("--bench", action="store_true", help="time decode at batch 1 beside llama-bench")
    p.add_argument("--reps", type=int, default=2, help="rounds of the interleaved timing (default 2)")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = p.parse_args()
    if mf.llama_cpp_dir() is None:
        sys.exit(f"llama.cpp (converter and build/bin) is in none of {[str(d) for d in mf.LLAMA_CPP_DIRS]}")
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(FAMILIES) - set(NOT_CONVERTED))
    if unknown:
        sys.exit(f"unknown families {unknown}; choose from {sorted(FAMILIES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for name in names:
        if name in NOT_CONVERTED:
            results[name] = {"skipped": NOT_CONVERTED[name]}
            print(f"{name}: {NOT_CONVERTED[name]}")
            continue
        q = make_files(name, args.out, args.keep_hf)
        results[name] = {"file": str(q), **check_loads(q)}
        print(f"{name}: {json.dumps(results[name])}", flush=True)
        if args.bench:
            results[name]["decode_batch_1"] = bench(q, args.reps)
            print(f"{name}: {json.dumps(results[name]['decode_batch_1'])}", flush=True)
        if args.json:  # after every family: a later failure keeps what was measured
            args.json.write_text(json.dumps(results, indent=2))
    for name in NOT_CONVERTED:
        results.setdefault(name, {"skipped": NOT_CONVERTED[name]})
    if args.bench:
        heads = ("family", "parameters", "flashdecode tok/s", "llama.cpp tok/s", "ratio", "fd, of roofline")
        print("\n| " + " | ".join(heads) + " |\n" + "|---" * len(heads) + "|")
        for name, r in results.items():
            if "decode_batch_1" in r:
                d = r["decode_batch_1"]
                cells = (
                    f"{r['parameters'] / 1e6:.0f}M",
                    f"{d['flashdecode_tok_s']:.1f}",
                    "-" if d["llama_cpp_tok_s"] is None else f"{d['llama_cpp_tok_s']:.1f}",
                    d["llama_cpp_error"] or f"{d['ratio']:.2f}x",
                    f"{d['fraction_of_roofline']:.0%}",
                )
                print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
