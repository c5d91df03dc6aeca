"""flashdecode against its peers on the same weights: llama.cpp and ik_llama.cpp as their own native
tools (``llama-bench``, ``llama-batched-bench``), and Hugging Face transformers.

    bash benchmarks/setup_peers.sh      # once: the peers' native tools and the shared weights
    python benchmarks/peers.py          # the full run -> docs/benchmarks.md + .png + .json
    python benchmarks/peers.py --quick  # CI: tiny model, one repetition, no compiled peer

Every (engine, model) measurement runs in its own process (a fresh heap, and the memory bandwidth of
that very process measured beside it: on these machines it is bimodal from process to process); the
engines run in interleaved order, rotated every repetition, each with the same number of threads, and
the peers' tools run one repetition per call, so that their figures interleave with flashdecode's.
Tasks: decode tokens/s at batch 1 from an empty context and at each ``--depths`` context (llama.cpp's
``llama-bench -d``, ik_llama.cpp's ``-gp``), aggregate decode tokens/s of ``--decode-batch`` concurrent
sequences (``llama-batched-bench``), and prefill tokens/s of ``--prefill`` prompts (``-p``).
flashdecode's figures come from the engine itself (``flashdecode bench``'s cell runner: the steps
after the first token, greedy). Figures are medians with min-max over repetitions, ratios flashdecode
/ peer, and fractions of the roofline bound (``flashdecode.tools.roofline``) at each process's own
bandwidth.

Subcommands: ``run`` (the default), ``prepare`` (the shared weights; setup_peers.sh calls it),
``report`` (re-render from the JSON) and ``worker`` (one measurement; internal).
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("flashdecode", "llama.cpp", "ik_llama.cpp", "transformers")
PEERS = ("llama.cpp", "ik_llama.cpp")  # native tools, from --llama-cpp-bin / --ik-llama-bin
ENGINE_COLORS = {
    "flashdecode": "#d62728",
    "llama.cpp": "#2ca02c",
    "ik_llama.cpp": "#9467bd",
    "transformers": "#1f77b4",
}

# The 1.1B Llama shape (TinyLlama's), random weights.
LLAMA_1B = dict(
    vocab_size=32000,
    hidden_size=2048,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    intermediate_size=5632,
    max_position_embeddings=8192,  # TinyLlama's is 2048; the benchmark decodes at depth 4096
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
# The quick mode's model: the same family, tiny.
LLAMA_TINY = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=160,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
# Qwen2.5-0.5B's shape, random weights: its tokenizer is trained to 2,000 tokens and the vocabulary
# padded, as tests/model_factory.py makes it
QWEN_05B = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)
DEFAULT_MODELS_DIR = ROOT / "bench-env" / "models"
DEFAULT_PEERS_DIR = ROOT / "bench-env" / "peers"
LLAMA_1B_DIR = "llama-1.1b-random"
QWEN_05B_DIR = "qwen2.5-0.5b-random"


# --- the weights -------------------------------------------------------------------------------------


def _corpus() -> list[str]:
    """Offline text for the random models' tokenizers: the package's own public-domain texts."""
    data = ROOT / "flashdecode" / "data"
    lines = []
    for name in ("calibration.txt", "heldout.txt"):
        path = data / name
        if path.exists():
            lines += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return lines or ["the quick brown fox jumps over the lazy dog"] * 10


def save_bpe_tokenizer_json(out_dir: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer.json trained on the corpus (what flashdecode reads from a folder)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"})
    )


def save_sentencepiece_model(out_dir: Path) -> None:
    """A SentencePiece BPE tokenizer.model (byte fallback) trained offline on the corpus; llama.cpp's
    converter reads it and pads the vocabulary to the model's 32000 with unused [PAD] tokens."""
    import sentencepiece as spm

    prefix = out_dir / "tokenizer"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_prefix=str(prefix),
        vocab_size=2000,
        hard_vocab_limit=False,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    prefix.with_suffix(".vocab").unlink(missing_ok=True)


def make_random_llama(
    out_dir: Path, shape: dict[str, Any], dtype: str, tokenizer: str, seed: int = 0
) -> Path:
    """A Llama-shaped model with random weights (std 0.02, unit norms), saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2)
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    with torch.no_grad():
        model = LlamaForCausalLM(config).to(torch_dtype)
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(torch_dtype))
    model.save_pretrained(out_dir, safe_serialization=True)
    del model
    if tokenizer == "sentencepiece":
        save_sentencepiece_model(out_dir)
    else:
        save_bpe_tokenizer_json(out_dir, shape["vocab_size"])
    return out_dir


def _quantize(bin_dir: Path, src: Path, dst: Path, ftype: str, threads: int) -> None:
    """llama.cpp's own ``llama-quantize``: the type mix a user's file of that name has."""
    tool = bin_dir / "llama-quantize"
    if not tool.exists():
        sys.exit(f"{tool} not found (run benchmarks/setup_peers.sh)")
    print(f"quantizing to {dst}", flush=True)
    tmp = dst.with_suffix(".tmp")
    subprocess.run([str(tool), str(src), str(tmp), ftype, str(threads)], check=True, capture_output=True)
    tmp.rename(dst)


def prepare_llama_1b(out: Path, convert: Path, bin_dir: Path, threads: int) -> list[Path]:
    """The 1.1B Llama: safetensors (bf16) -> GGUF bf16 (llama.cpp's converter) -> GGUF Q4_0."""
    hf_dir = out / LLAMA_1B_DIR
    bf16, q4_0 = out / "llama-1.1b-bf16.gguf", out / "llama-1.1b-q4_0.gguf"
    if not (hf_dir / "model.safetensors").exists() and not (hf_dir / "model.safetensors.index.json").exists():
        print(f"building the random 1.1B Llama in {hf_dir}", flush=True)
        make_random_llama(hf_dir, LLAMA_1B, "bf16", "sentencepiece")
    if not bf16.exists():
        if not convert.exists():
            sys.exit(f"llama.cpp's converter not found at {convert} (run benchmarks/setup_peers.sh)")
        print(f"converting to {bf16}", flush=True)
        tmp = bf16.with_suffix(".tmp")
        subprocess.run(
            [sys.executable, str(convert), str(hf_dir), "--outtype", "bf16", "--outfile", str(tmp)],
            check=True,
        )
        tmp.rename(bf16)
    if not q4_0.exists():
        _quantize(bin_dir, bf16, q4_0, "Q4_0", threads)
    return [hf_dir, bf16, q4_0]


def prepare_qwen_05b(out: Path, bin_dir: Path, threads: int) -> list[Path]:
    """The 0.5B Qwen2.5-shaped model: safetensors -> GGUF F16 (tests/model_factory.py's writer: llama.cpp's
    converter refuses a tokenizer it has no hash for) -> Q4_K_M by llama-quantize, whose type mix for
    a hidden size that is no multiple of 256 (Q5_0, Q8_0, Q4_K, Q6_K) is what real small files have."""
    sys.path.insert(0, str(ROOT / "tests"))
    import model_factory

    hf_dir, f16, q4_k_m = out / QWEN_05B_DIR, out / "qwen2.5-0.5b-f16.gguf", out / "qwen2.5-0.5b-q4_k_m.gguf"
    if not (hf_dir / "model.safetensors").exists():
        print(f"building the random 0.5B Qwen2.5 in {hf_dir}", flush=True)
        model_factory.make_hf_model("qwen2", hf_dir, seed=3, tokenizer_vocab=2000, **QWEN_05B)
    if not f16.exists():
        model_factory.hf_to_gguf(hf_dir, f16, "F16")
    if not q4_k_m.exists():
        _quantize(bin_dir, f16, q4_k_m, "Q4_K_M", threads)
    return [hf_dir, f16, q4_k_m]


def cmd_prepare(args: argparse.Namespace) -> int:
    """The shared weights every engine loads; files already there are kept."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    convert = Path(args.llama_cpp_src) / "convert_hf_to_gguf.py"
    bin_dir = Path(args.llama_cpp_bin)
    paths = prepare_qwen_05b(out, bin_dir, args.threads)
    paths += prepare_llama_1b(out, convert, bin_dir, args.threads)
    for path in paths:
        print(f"ready: {path}")
    return 0


# --- one measurement (runs in its own process) -------------------------------------------------------


def _random_ids(rng: random.Random, vocab: int, n: int, avoid: set[int]) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        t = rng.randrange(3, vocab)
        if t not in avoid:
            ids.append(t)
    return ids


class FlashdecodeRunner:
    def __init__(self, model: str, threads: int, tasks: list[dict[str, Any]]):
        from flashdecode.entrypoints.llm import LLM

        longest = max(t["prompt_len"] + t.get("gen_len", 1) for t in tasks) + 1
        batch = max(t.get("batch", 1) for t in tasks)
        self.engine = LLM(
            model=model,
            max_model_len=longest,
            max_num_seqs=batch,
            enable_prefix_caching=False,
            num_threads=threads,
        ).engine
        self.rng = random.Random(0)

    def warmup(self) -> None:
        from flashdecode.tools.bench import run_cell

        run_cell(self.engine, 1, 8, 2, self.rng)

    def decode(self, batch: int, prompt_len: int, gen_len: int) -> float:
        from flashdecode.tools.bench import run_cell

        # depth 0 is a one-token prompt here: a request has at least one
        return run_cell(self.engine, batch, max(prompt_len, 1), gen_len, self.rng).decode_tok_s

    def prefill(self, prompt_len: int) -> float:
        from flashdecode.tools.bench import run_cell

        return run_cell(self.engine, 1, prompt_len, 2, self.rng).prefill_tok_s


class TransformersRunner:
    """transformers' own forward with its KV cache, greedy, in inference mode: what ``generate`` runs,
    without its per-step bookkeeping, and with logits only for the last prompt position."""

    def __init__(self, model: str, threads: int, tasks: list[dict[str, Any]]):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        path = Path(model)
        kwargs: dict[str, Any] = {}
        if path.is_file():  # a GGUF file: transformers dequantizes it (to fp32, as flashdecode computes)
            kwargs = {"gguf_file": path.name}
            path = path.parent
            dtype = torch.float32
        else:
            config = json.loads((path / "config.json").read_text())
            dtype = getattr(torch, config.get("torch_dtype") or config.get("dtype") or "float32")
        try:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
        except TypeError:
            self.model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, **kwargs)
        self.model.eval()
        self.vocab = self.model.config.vocab_size
        self.rng = random.Random(0)
        self.torch = torch

    def _forward(self, ids: Any, past: Any) -> tuple[Any, Any]:
        try:
            out = self.model(input_ids=ids, past_key_values=past, use_cache=True, logits_to_keep=1)
        except TypeError:
            out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
        return out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values

    def _ids(self, batch: int, n: int) -> Any:
        rows = [_random_ids(self.rng, self.vocab, n, set()) for _ in range(batch)]
        return self.torch.tensor(rows, dtype=self.torch.long)

    def warmup(self) -> None:
        self.decode(1, 8, 2)

    def decode(self, batch: int, prompt_len: int, gen_len: int) -> float:
        with self.torch.inference_mode():
            token, past = self._forward(self._ids(batch, max(prompt_len, 1)), None)
            start = time.perf_counter()
            for _ in range(gen_len - 1):
                token, past = self._forward(token, past)
            return batch * (gen_len - 1) / (time.perf_counter() - start)

    def prefill(self, prompt_len: int) -> float:
        ids = self._ids(1, prompt_len)
        with self.torch.inference_mode():
            start = time.perf_counter()
            self._forward(ids, None)
            return prompt_len / (time.perf_counter() - start)


class NativeBenchRunner:
    """llama.cpp's (or ik_llama.cpp's) own benchmark tools, one repetition per call: ``llama-bench``
    for batch 1 (``-n`` tokens at ``-d`` depth; ik_llama.cpp spells the depth ``-gp depth,n`` and
    repacks its weights at load with ``-rtr 1``, its fast CPU path) and prefill (``-p``), and
    ``llama-batched-bench`` for several sequences decoding at once (its S_TG: generated tokens/s)."""

    def __init__(self, model: str, threads: int, tasks: list[dict[str, Any]], bin_dir: str, ik: bool):
        self.model, self.threads, self.ik = model, threads, ik
        self.bin = Path(bin_dir)
        self.version: str | None = None  # the build commit llama-bench reports
        if not (self.bin / "llama-bench").exists():
            raise RuntimeError(f"no llama-bench in {self.bin}")

    def _run(self, cmd: list[str]) -> str:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = " | ".join(proc.stderr.strip().splitlines()[-2:])
            raise RuntimeError(f"{Path(cmd[0]).name} exited {proc.returncode}: {tail}")
        return proc.stdout

    def _bench(self, args: list[str]) -> float:
        cmd = [
            str(self.bin / "llama-bench"),
            "-m",
            self.model,
            "-t",
            str(self.threads),
            "-r",
            "1",
            "-o",
            "json",
        ]
        cmd += (["-rtr", "1"] if self.ik else []) + args
        result = json.loads(self._run(cmd))[-1]
        self.version = result.get("build_commit")
        return float(result["avg_ts"])

    def warmup(self) -> None:
        self._bench(["-p", "0", "-n", "4"])

    def decode(self, batch: int, prompt_len: int, gen_len: int) -> float:
        if batch > 1:
            return self._batched(batch, prompt_len, gen_len)
        if prompt_len == 0:
            return self._bench(["-p", "0", "-n", str(gen_len)])
        if self.ik:
            return self._bench(["-p", "0", "-n", "0", "-gp", f"{prompt_len},{gen_len}"])
        return self._bench(["-p", "0", "-n", str(gen_len), "-d", str(prompt_len)])

    def _batched(self, batch: int, prompt_len: int, gen_len: int) -> float:
        tool = self.bin / "llama-batched-bench"
        if not tool.exists():
            raise RuntimeError(f"n/a: no llama-batched-bench in {self.bin}")
        cmd = [
            str(tool),
            "-m",
            self.model,
            "-t",
            str(self.threads),
            "-c",
            str(batch * (prompt_len + gen_len) + 64),
        ]
        cmd += ["-npp", str(prompt_len), "-ntg", str(gen_len), "-npl", str(batch), "--output-format", "jsonl"]
        out = self._run(cmd)
        rows = [
            json.loads(line) for line in out.splitlines() if line.startswith("{") and '"speed_tg"' in line
        ]
        if not rows:
            raise RuntimeError("llama-batched-bench printed no result")
        return float(rows[-1]["speed_tg"])

    def prefill(self, prompt_len: int) -> float:
        return self._bench(["-p", str(prompt_len), "-n", "0"])


def make_runner(
    engine: str, model: str, threads: int, tasks: list[dict[str, Any]], args: argparse.Namespace
) -> Any:
    if engine == "flashdecode":
        return FlashdecodeRunner(model, threads, tasks)
    if engine == "transformers":
        return TransformersRunner(model, threads, tasks)
    bin_dir = args.llama_cpp_bin if engine == "llama.cpp" else args.ik_llama_bin
    return NativeBenchRunner(model, threads, tasks, bin_dir, ik=engine == "ik_llama.cpp")


def cmd_worker(args: argparse.Namespace) -> int:
    """Measure one engine on one model: bandwidth first (this process's), then every task."""
    import torch

    from flashdecode.tools import probe

    torch.set_num_threads(args.threads)
    tasks = json.loads(args.tasks)
    result: dict[str, Any] = {"engine": args.engine, "model": args.model, "pid": os.getpid()}
    result["bandwidth"] = probe.measure_memory_bandwidth(args.threads, min_time=args.bandwidth_time)
    start = time.perf_counter()
    runner = make_runner(args.engine, args.model, args.threads, tasks, args)
    result["load_s"] = time.perf_counter() - start
    runner.warmup()
    result["tasks"] = []
    for task in tasks:
        try:
            if task["kind"] == "decode":
                tok_s = runner.decode(task["batch"], task["prompt_len"], task["gen_len"])
            else:
                tok_s = runner.prefill(task["prompt_len"])
        except RuntimeError as e:  # a task this engine cannot run (ik_llama.cpp has no batched bench built)
            result["tasks"].append({**task, "error": str(e)})
            continue
        result["tasks"].append({**task, "tok_s": tok_s})
    result["bandwidth_after"] = probe.measure_memory_bandwidth(args.threads, min_time=args.bandwidth_time)
    result["version"] = getattr(runner, "version", None)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# --- the run -----------------------------------------------------------------------------------------


def task_list(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Batch-1 decode at each depth (0: an empty context), aggregate decode of each batch, prefills."""
    tasks = [{"kind": "decode", "batch": 1, "prompt_len": d, "gen_len": args.decode_len} for d in args.depths]
    tasks += [
        {"kind": "decode", "batch": b, "prompt_len": args.decode_prompt, "gen_len": args.batched_len}
        for b in args.decode_batch
    ]
    tasks += [{"kind": "prefill", "batch": 1, "prompt_len": p} for p in args.prefill]
    return tasks


def model_tasks(model: dict[str, Any], tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tasks run on ``model``: aggregate decode only where the model asks for it (it is the
    longest task, and one model shows it)."""
    return [t for t in tasks if t["batch"] == 1 or model.get("batched")]


def task_name(task: dict[str, Any]) -> str:
    if task["kind"] == "prefill":
        return f"prefill {task['prompt_len']}"
    if task["batch"] == 1:
        return "decode B=1" + (f" at depth {task['prompt_len']}" if task["prompt_len"] else "")
    return f"decode B={task['batch']}"


def model_table(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The models of this run: for each, the file every engine loads (None: not run)."""
    from flashdecode.models.loader import embedded_model_path

    if args.quick:
        tiny = Path(args.work_dir) / "llama-tiny-random"
        if not (tiny / "config.json").exists():
            make_random_llama(tiny, LLAMA_TINY, "fp32", "bpe")
        files = dict.fromkeys(ENGINES) | {"flashdecode": str(tiny), "transformers": str(tiny)}
        return [
            {
                "key": "tiny",
                "label": "tiny random Llama (fp32 safetensors)",
                "files": files,
                "roofline_file": str(tiny),
                "batched": True,
            }
        ]
    models_dir = Path(args.models_dir)
    embedded = str(embedded_model_path())

    def gguf(key: str, label: str, path: str, transformers: str | None = None, notes: str = "") -> dict:
        files = {"flashdecode": path, "llama.cpp": path, "ik_llama.cpp": path, "transformers": transformers}
        return {"key": key, "label": label, "files": files, "roofline_file": path, "notes": notes}

    bf16 = str(models_dir / "llama-1.1b-bf16.gguf")
    models = [
        gguf(
            "embedded",
            "SmolLM2-135M-Instruct Q4_1 (embedded GGUF)",
            embedded,
            embedded,
            "transformers dequantizes the GGUF to fp32 at load",
        ),
        gguf(
            "0.5b-q4_k_m",
            "Qwen2.5-0.5B-shaped, random, Q4_K_M (llama-quantize)",
            str(models_dir / "qwen2.5-0.5b-q4_k_m.gguf"),
            notes="tensors Q5_0, Q8_0, Q4_K and Q6_K, as llama-quantize makes a real small Q4_K_M",
        ),
        gguf(
            "1.1b-q4_0",
            "Llama 1.1B-shaped, random, Q4_0 (llama-quantize)",
            str(models_dir / "llama-1.1b-q4_0.gguf"),
        ),
        gguf(
            "1.1b-bf16",
            "Llama 1.1B-shaped, random, bf16",
            bf16,
            str(models_dir / LLAMA_1B_DIR),
            "transformers loads the safetensors the GGUF was converted from",
        ),
    ]
    wanted = set(args.models)
    models = [m | {"batched": m["key"] in args.batched_models} for m in models if m["key"] in wanted]
    for m in models:
        for engine, path in m["files"].items():
            if path is not None and not Path(path).exists():
                sys.exit(f"{path} is missing for {engine}: run benchmarks/setup_peers.sh first")
    return models


def run_worker(engine: str, path: str, tasks: list[dict[str, Any]], args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "worker", "--engine", engine, "--model", path]
    cmd += ["--threads", str(args.threads), "--tasks", json.dumps(tasks)]
    cmd += ["--bandwidth-time", str(args.bandwidth_time)]
    cmd += ["--llama-cpp-bin", args.llama_cpp_bin, "--ik-llama-bin", args.ik_llama_bin]
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(args.threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
    )
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"engine": engine, "error": f"timed out after {args.worker_timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            result["wall_s"] = time.perf_counter() - start
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"engine": engine, "error": f"exit {proc.returncode}: " + " | ".join(tail)}


@functools.cache
def _describe(model_file: str) -> tuple[Any, dict[str, str]]:
    from flashdecode.tools.roofline import describe_model

    spec, formats, _ = describe_model(model_file)
    return spec, formats


def roofline_bound(model_file: str, task: dict[str, Any], bandwidth: float, threads: int) -> float:
    """tokens/s bound of a task at ``bandwidth``, weights in their stored format, a 16-bit KV cache."""
    from flashdecode.tools.roofline import Ceilings, ModelCost, machine_ceilings

    spec, formats = _describe(model_file)
    cost = ModelCost(
        spec, formats, activation_bytes=2, kv_bytes_per_token=2 * spec.num_layers * spec.kv_size * 2
    )
    cached = machine_ceilings(threads)
    ceilings = Ceilings(bandwidth=bandwidth, flops=cached.flops, threads=threads, cpu=cached.cpu)
    compute = cost.compute_dtype()
    if task["kind"] == "decode":
        step = cost.decode_step(task["batch"], task["prompt_len"] + 1 + task["gen_len"] // 2)
    else:
        step = cost.prefill(task["prompt_len"])
    return step.tokens_per_s(ceilings, compute)


def stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(models: list[dict], tasks: list[dict], results: list[dict], threads: int) -> dict[str, Any]:
    """Per (model, task, engine): the rates and roofline fractions over repetitions."""
    rows = []
    bound_cache: dict[tuple, float] = {}
    for m in models:
        for task in model_tasks(m, tasks):
            row: dict[str, Any] = {"model": m["key"], "task": task_name(task), "engines": {}}
            for engine in ENGINES:
                rates, fractions, bws, errors = [], [], [], []
                for r in results:
                    if r["model_key"] != m["key"] or r["engine"] != engine:
                        continue
                    if "error" in r:
                        errors.append(r["error"])
                        continue
                    t = next(x for x in r["tasks"] if task_name(x) == task_name(task))
                    if "error" in t:
                        errors.append(t["error"])
                        continue
                    key = (m["key"], task_name(task), round(r["bandwidth"]))
                    if key not in bound_cache:
                        bound_cache[key] = roofline_bound(m["roofline_file"], task, r["bandwidth"], threads)
                    rates.append(t["tok_s"])
                    fractions.append(t["tok_s"] / bound_cache[key])
                    bws.append(r["bandwidth"])
                row["engines"][engine] = {
                    "tok_s": stats(rates),
                    "fraction": stats(fractions),
                    "bandwidth": stats(bws),
                    "errors": errors,
                    "skipped": m["files"][engine] is None,
                }
            all_bw = [r["bandwidth"] for r in results if r["model_key"] == m["key"] and "bandwidth" in r]
            if all_bw:
                row["bound_tok_s"] = roofline_bound(
                    m["roofline_file"], task, statistics.median(all_bw), threads
                )
            rows.append(row)
    return {"rows": rows}


# --- the report --------------------------------------------------------------------------------------


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _cell(entry: dict[str, Any], quick_skip: str = "n/a") -> str:
    if entry["skipped"]:
        return quick_skip
    if entry["tok_s"] is None:
        if entry["errors"] and all(e.startswith("n/a") for e in entry["errors"]):
            return "n/a"  # a tool this peer's build does not have
        return "error" if entry["errors"] else "not run"
    s = entry["tok_s"]
    if s["n"] == 1:
        return _num(s["median"])
    return f"{_num(s['median'])} ({_num(s['min'])}-{_num(s['max'])})"


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> str:
    if a["tok_s"] is None or b["tok_s"] is None:
        return "-"
    return f"{a['tok_s']['median'] / b['tok_s']['median']:.2f}x"


def _frac(entry: dict[str, Any]) -> str:
    if entry["fraction"] is None:
        return "-"
    return f"{100 * entry['fraction']['median']:.1f}%"


def machine_description(threads: int) -> dict[str, Any]:
    from flashdecode.utils import cpuinfo

    flags = cpuinfo.cpu_flags()
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"]
    wanted += ["avx512vbmi", "amx_tile", "amx_bf16", "amx_int8"]
    mem_gib = 0.0
    try:
        with open("/proc/meminfo") as f:
            mem_gib = int(f.readline().split()[1]) / (1 << 20)
    except (OSError, ValueError, IndexError):
        pass
    versions: dict[str, str] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "flashdecode"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "?")
        except Exception:
            versions[name] = "not installed"
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        commit += " + uncommitted changes" if dirty else ""
    except OSError:
        commit = "?"
    return {
        "cpu": cpuinfo.cpu_model(),
        "physical_cores": cpuinfo.physical_cores(),
        "threads": threads,
        "memory_gib": round(mem_gib, 1),
        "flags": [f for f in wanted if f in flags],
        "kernel": platform.release(),
        "versions": versions,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def serve_status() -> str:
    return (
        "`flashdecode bench serve` against `llama-server` (same llama.cpp source) is in "
        "docs/server_tools.md; this script measures the engines alone"
    )


def write_chart(path: Path, models: list[dict], tasks: list[dict], summary: dict[str, Any]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return False
    names = [task_name(t) for t in tasks]
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.2), squeeze=False)
    for ax, m in zip(axes[0], models):
        rows = {r["task"]: r for r in summary["rows"] if r["model"] == m["key"]}
        width = 0.8 / len(ENGINES)
        for i, engine in enumerate(ENGINES):
            xs, ys, lo, hi = [], [], [], []
            for j, name in enumerate(names):
                s = rows[name]["engines"][engine]["tok_s"] if name in rows else None
                if s is None:
                    continue
                xs.append(j + (i - (len(ENGINES) - 1) / 2) * width)
                ys.append(s["median"])
                lo.append(s["median"] - s["min"])
                hi.append(s["max"] - s["median"])
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], label=engine, color=ENGINE_COLORS[engine], capsize=2)
        for j, name in enumerate(names):
            bound = rows[name].get("bound_tok_s") if name in rows else None
            if bound:
                ax.plot([j - 0.45, j + 0.45], [bound, bound], color="black", ls="--", lw=1)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_yscale("log")
        ax.set_title(m["label"], fontsize=9)
        ax.set_ylabel("tokens/s (log)")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0][0].plot([], [], color="black", ls="--", lw=1, label="roofline bound")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render_markdown(report: dict[str, Any], chart_name: str | None, roofline_name: str | None = None) -> str:
    machine, models = report["machine"], report["models"]
    summary, results = report["summary"], report["results"]
    quick = report["quick"]
    lines = ["# Benchmarks: flashdecode vs llama.cpp, ik_llama.cpp and transformers", ""]
    lines += [
        "Generated by `benchmarks/peers.py`"
        + (" in **quick mode** (tiny shapes; not a measurement)" if quick else "")
        + f" on {machine['date']}; flashdecode at commit {machine['commit']}. Regenerate with the commands"
        " below; do not edit the tables by hand.",
        "",
        "## Machine",
        "",
        f"- CPU: {machine['cpu']}, {machine['physical_cores']} physical cores; "
        f"{machine['memory_gib']} GiB RAM; kernel {machine['kernel']}",
        f"- SIMD: {', '.join(machine['flags']) or 'none detected'}",
        f"- every engine runs with {machine['threads']} threads",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()),
    ]
    builds = {r["engine"]: r["version"] for r in results if r.get("version")}
    if builds:
        lines.append(
            "- peers, their native tools built with GGML_NATIVE=OFF and this CPU's extensions named one by "
            "one (benchmarks/setup_peers.sh): "
            + ", ".join(f"{k} commit {v}" for k, v in sorted(builds.items()))
        )
    bws = [r["bandwidth"] / 1e9 for r in results if "bandwidth" in r]
    if bws:
        lines.append(
            f"- memory read bandwidth, measured in each benchmark process (it is bimodal from process to "
            f"process here): median {statistics.median(bws):.1f} GB/s, min {min(bws):.1f}, "
            f"max {max(bws):.1f} over {len(bws)} processes; per process in the table below"
        )
    ceil = report.get("ceilings")
    if ceil:
        flops = ", ".join(f"{k} {v / 1e9:,.0f}" for k, v in ceil["flops"].items() if v > 0)
        lines.append(f"- matmul ceilings (cached `flashdecode roofline` probe), GFLOP/s: {flops}")
    lines += ["", "## Commands", "", "```bash"] + report["commands"] + ["```", ""]
    lines += [
        "## Results",
        "",
        f"Tokens/s: median (min-max) over {report['reps']} repetition(s), engines interleaved. Decode at "
        f"batch 1: {report['decode_len']} tokens generated after a context of the depth named (llama.cpp's "
        "`llama-bench -n N -d D`, ik_llama.cpp's `-gp D,N`; flashdecode: a prompt of D tokens, or 1 for "
        f"depth 0, the steps after the first token timed). Decode B>1: {report['decode_prompt']}-token "
        f"prompts, {report['batched_len']} tokens each, the aggregate generated tokens/s "
        "(`llama-batched-bench`'s S_TG). Prefill: one prompt, its tokens/s (`llama-bench -p`). The peers "
        "are their native tools, one repetition per call. Roofline: the bound at the bandwidth measured in "
        "the same processes, weights in their stored format, a 16-bit KV cache "
        "(`flashdecode/tools/roofline.py`); each engine's figure as a fraction of the bound of its "
        "own process.",
        "",
    ]
    engines = [e for e in ENGINES if any(not r["engines"][e]["skipped"] for r in summary["rows"])]
    peers = [e for e in engines if e != "flashdecode"]
    columns = ["model", "task", *engines, *(f"fd / {e}" for e in peers), "bound tok/s"]
    columns += [f"{e} of bound" for e in engines]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    labels = {m["key"]: m["label"] for m in models}
    for row in summary["rows"]:
        e = row["engines"]
        bound = _num(row["bound_tok_s"]) if row.get("bound_tok_s") else "-"
        cells = [_cell(e[x]) for x in engines] + [_ratio(e["flashdecode"], e[x]) for x in peers]
        cells += [bound] + [_frac(e[x]) for x in engines]
        lines.append(f"| {labels[row['model']]} | {row['task']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"Serving: {serve_status()}.", ""]
    bw_rows = []
    for m in models:
        for engine in ENGINES:
            values = [
                r["bandwidth"] / 1e9
                for r in results
                if r.get("model_key") == m["key"] and r["engine"] == engine and "bandwidth" in r
            ]
            if values:
                bw_rows.append(f"| {m['label']} | {engine} | " + ", ".join(f"{v:.1f}" for v in values) + " |")
    if bw_rows:
        lines += ["Memory bandwidth of each benchmark process, GB/s, in run order:", ""]
        lines += ["| model | engine | GB/s |", "|---|---|---|"] + bw_rows + [""]
    notes = [f"- {m['label']}: {m['notes']}" for m in models if m.get("notes")]
    errors = [f"- {r['engine']} on {r['model_key']}: {r['error']}" for r in results if "error" in r]
    if notes:
        lines += ["Notes:", ""] + notes + [""]
    if errors:
        lines += ["Failed runs:", ""] + errors + [""]
    if chart_name:
        lines += [f"![tokens/s per engine, log scale; dashed: roofline bound]({chart_name})", ""]
    if roofline_name:
        lines += [
            "## Roofline",
            "",
            "The machine's roofline with a model's decode steps and prefills placed on it "
            "(`flashdecode roofline`, command above):",
            "",
            f"![roofline]({roofline_name})",
            "",
        ]
    lines += ["## Targets (issue #15)", ""] + headline(summary) + [""]
    spread = noisy_cells(summary)
    caveats = [report["note"], ""] if report.get("note") else []
    if spread:
        caveats += [
            f"{len(spread)} of the figures below spread more than 2x between repetitions "
            f"({', '.join(spread[:6])}{', ...' if len(spread) > 6 else ''}): the machine was not quiet "
            "during this run, and those medians say more about the other load than about the engines.",
            "",
        ]
    if caveats:  # right under the title, before any figure
        lines[4:4] = ["## Caveats", "", *caveats]
    return "\n".join(lines)


def noisy_cells(summary: dict[str, Any], factor: float = 2.0) -> list[str]:
    """The (model, task, engine) figures whose max/min over repetitions exceeds ``factor``."""
    out = []
    for row in summary["rows"]:
        for engine, e in row["engines"].items():
            s = e["tok_s"]
            if s and s["n"] > 1 and s["min"] > 0 and s["max"] / s["min"] > factor:
                out.append(f"{engine} {row['model']} {row['task']}")
    return out


def _median(entry: dict[str, Any]) -> float | None:
    return entry["tok_s"]["median"] if entry["tok_s"] else None


def _target(name: str, fd: float | None, peer: float | None, want: float) -> str:
    if fd is None or peer is None:
        return f"- {name}: not measured"
    ratio = fd / peer
    return f"- {name}: {ratio:.2f}x (target >= {want:g}x): **{'met' if ratio >= want else 'not met'}**"


def headline(summary: dict[str, Any]) -> list[str]:
    """Each of issue #15's speed targets this run measured, met or not."""
    rows = {(r["model"], r["task"]): r for r in summary["rows"]}
    out = []
    for (model, task), row in rows.items():
        e = row["engines"]
        fd = _median(e["flashdecode"])
        if task.startswith("decode B=1"):
            out.append(_target(f"{model}, {task}, vs ik_llama.cpp", fd, _median(e["ik_llama.cpp"]), 1.0))
            out.append(_target(f"{model}, {task}, vs llama.cpp", fd, _median(e["llama.cpp"]), 1.5))
        elif task.startswith("decode B="):
            out.append(_target(f"{model}, {task}, vs llama.cpp", fd, _median(e["llama.cpp"]), 2.0))
        elif task == "prefill 512":
            out.append(_target(f"{model}, {task}, vs ik_llama.cpp", fd, _median(e["ik_llama.cpp"]), 1.0))
    for model in {m for m, _ in rows}:
        base, deep = rows.get((model, "decode B=1")), rows.get((model, "decode B=1 at depth 4096"))
        if not (base and deep and base.get("bound_tok_s") and deep.get("bound_tok_s")):
            continue
        fd0, fd1 = _median(base["engines"]["flashdecode"]), _median(deep["engines"]["flashdecode"])
        if fd0 and fd1:
            explained = deep["bound_tok_s"] / base["bound_tok_s"]
            verdict = "met" if fd1 / fd0 >= explained else "not met"
            out.append(
                f"- {model}, depth 4096 vs empty context: {fd1 / fd0:.2f}x the speed, the roofline's "
                f"extra KV bytes explain {explained:.2f}x: **{verdict}**"
            )
    return out or ["- no figures for the targets in this run"]


def cmd_run(args: argparse.Namespace) -> int:
    from flashdecode.tools.roofline import machine_ceilings

    if args.quick:
        args.reps = args.reps or 1
        args.depths = args.depths or [0, 8]
        args.decode_batch = args.decode_batch or [2]
        args.prefill = args.prefill or [16, 32]
        args.decode_prompt = args.decode_prompt or 8
        args.decode_len = args.decode_len or 4
        args.batched_len = args.batched_len or 4
        args.engines = ["flashdecode", "transformers"]
        if args.work_dir is None:
            args.work_dir = tempfile.mkdtemp(prefix="flashdecode-peers-quick-")
            atexit.register(shutil.rmtree, args.work_dir, ignore_errors=True)
        out_dir = Path(args.out_dir or args.work_dir)
    else:
        args.reps = args.reps or 3
        args.depths = args.depths if args.depths is not None else [0, 512, 4096]
        args.decode_batch = args.decode_batch or [8, 32]
        args.prefill = args.prefill or [512]
        args.decode_prompt = args.decode_prompt or 128
        args.decode_len = args.decode_len or 64
        args.batched_len = args.batched_len or 128
        args.work_dir = args.work_dir or str(ROOT / "bench-env")
        out_dir = Path(args.out_dir or ROOT / "docs")
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_description(args.threads)
    # the matmul ceilings `flashdecode roofline` measured and cached (measured now if none are)
    ceilings = machine_ceilings(args.threads)
    models = model_table(args)
    tasks = task_list(args)
    engines = [e for e in ENGINES if e in args.engines]
    plan = []
    for rep in range(args.reps):
        for m in models:
            order = engines[rep % len(engines) :] + engines[: rep % len(engines)]  # rotate every repetition
            plan += [(rep, m, e) for e in order if m["files"][e] is not None]
    results = []
    for i, (rep, m, engine) in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] rep {rep + 1}: {engine} on {m['key']}", end=" ", flush=True)
        r = run_worker(engine, m["files"][engine], model_tasks(m, tasks), args)
        r.update(model_key=m["key"], rep=rep)
        results.append(r)
        if "error" in r:
            print(f"ERROR {r['error']}", flush=True)
        else:
            figures = ", ".join(f"{task_name(t)} {_num(t['tok_s'])}" for t in r["tasks"] if "tok_s" in t)
            print(f"{r['bandwidth'] / 1e9:.1f} GB/s; {figures} tok/s", flush=True)
    for m in models:  # a model the run did not measure with an engine stays "n/a", not "error"
        for e in ENGINES:
            if e not in engines and m["files"][e] is not None:
                m["files"][e] = None
    summary = summarize(models, tasks, results, args.threads)
    argv = " ".join(sys.argv[1:])
    commands = [] if args.quick else ["bash benchmarks/setup_peers.sh   # once, about 25 minutes on 2 cores"]
    commands.append(f"python benchmarks/peers.py {argv}".strip())
    if not args.quick:
        model = "bench-env/models/qwen2.5-0.5b-q4_k_m.gguf"
        commands += [
            f"flashdecode bench --model {model} --batch 1,8,32 --prompt-len 128,512 --gen-len 64 "
            "--json bench-env/bench-0.5b.json",
            f"flashdecode roofline --model {model} --bench bench-env/bench-0.5b.json "
            "--plot docs/roofline.png",
            "python benchmarks/peers.py report   # re-renders this page with the roofline",
        ]
    report = {
        "quick": args.quick,
        "machine": machine,
        "ceilings": ceilings.to_json(),
        "reps": args.reps,
        "threads": args.threads,
        "decode_prompt": args.decode_prompt,
        "decode_len": args.decode_len,
        "batched_len": args.batched_len,
        "models": models,
        "tasks": tasks,
        "results": results,
        "summary": summary,
        "commands": commands,
        "note": args.note,
    }
    (out_dir / "benchmarks.json").write_text(json.dumps(report, indent=2))
    write_report(report, out_dir)
    failed = [r for r in results if "error" in r]
    failed_tasks = [
        t for r in results for t in r.get("tasks", []) if not t.get("error", "n/a").startswith("n/a")
    ]
    # quick mode (CI) fails on any failed run or task; a full run only when nothing could be measured
    if args.quick:
        return 1 if failed or failed_tasks else 0
    return 1 if failed and len(failed) == len(results) else 0


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """benchmarks.md and benchmarks.png from a run's report (also ``peers.py report``)."""
    chart = out_dir / "benchmarks.png"
    has_chart = write_chart(chart, report["models"], report["tasks"], report["summary"])
    roofline_png = out_dir / "roofline.png"
    markdown = render_markdown(
        report, chart.name if has_chart else None, roofline_png.name if roofline_png.exists() else None
    )
    (out_dir / "benchmarks.md").write_text(markdown)
    print(markdown)
    print(f"wrote {out_dir / 'benchmarks.md'}" + (f", {chart}" if has_chart else ""))


def cmd_report(args: argparse.Namespace) -> int:
    """Re-render benchmarks.md and the chart from a saved benchmarks.json (no measurement)."""
    path = Path(args.json)
    report = json.loads(path.read_text())
    if args.note is not None:
        report["note"] = args.note
        path.write_text(json.dumps(report, indent=2))
    write_report(report, path.parent)
    return 0


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    sub = p.add_subparsers(dest="command")

    run = sub.add_parser("run", help="the benchmark (default)", allow_abbrev=False)
    prep = sub.add_parser(
        "prepare", help="build the shared weights (setup_peers.sh runs it)", allow_abbrev=False
    )
    worker = sub.add_parser("worker", help="one measurement in this process (internal)", allow_abbrev=False)
    report = sub.add_parser("report", help="re-render benchmarks.md from benchmarks.json", allow_abbrev=False)
    report.add_argument("--json", default=str(ROOT / "docs" / "benchmarks.json"))
    report.add_argument("--note", default=None, help="a caveat paragraph for the page (kept in the JSON)")
    for q in (p, run):
        q.add_argument("--quick", action="store_true", help="CI: tiny model, 1 rep, no compiled peer")
        q.add_argument("--reps", type=int, default=None, help="repetitions (default 3; quick 1)")
        q.add_argument("--threads", type=int, default=2)
        q.add_argument(
            "--engines", type=lambda s: s.split(","), default=["flashdecode", "llama.cpp", "ik_llama.cpp"]
        )
        q.add_argument(
            "--models", type=lambda s: s.split(","), default=["embedded", "0.5b-q4_k_m", "1.1b-q4_0"]
        )
        q.add_argument("--models-dir", default=str(DEFAULT_MODELS_DIR))
        q.add_argument(
            "--depths", type=_int_list, default=None, help="batch-1 decode contexts (default 0,512,4096)"
        )
        q.add_argument("--decode-len", type=int, default=None, help="batch-1 tokens generated (default 64)")
        q.add_argument(
            "--decode-batch", type=_int_list, default=None, help="aggregate decode batches (default 8,32)"
        )
        q.add_argument(
            "--batched-models",
            type=lambda s: s.split(","),
            default=["embedded"],
            help="models run at --decode-batch",
        )
        q.add_argument("--decode-prompt", type=int, default=None, help="their prompts (default 128)")
        q.add_argument("--batched-len", type=int, default=None, help="their tokens each (default 128)")
        q.add_argument("--prefill", type=_int_list, default=None, help="prompt lengths (default 512)")
        q.add_argument("--out-dir", default=None, help="where benchmarks.md/.png/.json go (default docs/)")
        q.add_argument("--work-dir", default=None)
        q.add_argument("--worker-timeout", type=int, default=1800)
        q.add_argument("--bandwidth-time", type=float, default=0.5, help="seconds per bandwidth probe")
        q.add_argument("--note", default=None, help="a caveat paragraph for the page")
    for q in (p, run, worker):
        q.add_argument("--llama-cpp-bin", default=str(DEFAULT_PEERS_DIR / "llama.cpp" / "build" / "bin"))
        q.add_argument("--ik-llama-bin", default=str(DEFAULT_PEERS_DIR / "ik_llama.cpp" / "build" / "bin"))
    prep.add_argument("--out", default=str(DEFAULT_MODELS_DIR))
    prep.add_argument(
        "--llama-cpp-src",
        default=str(DEFAULT_PEERS_DIR / "llama.cpp"),
        help="llama.cpp's source (its convert_hf_to_gguf.py)",
    )
    prep.add_argument("--llama-cpp-bin", default=str(DEFAULT_PEERS_DIR / "llama.cpp" / "build" / "bin"))
    prep.add_argument("--threads", type=int, default=2)
    worker.add_argument("--engine", choices=ENGINES, required=True)
    worker.add_argument("--model", required=True)
    worker.add_argument("--threads", type=int, default=2)
    worker.add_argument("--tasks", required=True)
    worker.add_argument("--bandwidth-time", type=float, default=0.5)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    if args.command == "prepare":
        return cmd_prepare(args)
    if args.command == "worker":
        return cmd_worker(args)
    if args.command == "report":
        return cmd_report(args)
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
