"""``flashdecode generate | chat | info``: the commands that use the engine as a user would."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

from ..config import DEVICES, KV_CACHE_DTYPES, NUMERICS_MODES
from ..models.loader import load_model
from ..models.spec import ModelSpec
from ..sampling_params import SamplingParams
from .llm import LLM


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="GGUF file or Hugging Face folder (default: embedded SmolLM2-135M)"
    )
    p.add_argument("--dtype", default="auto", help="compute dtype: auto, float32, bfloat16")
    p.add_argument("--max-model-len", type=int, default=None, help="context length per sequence")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="cpu (native C kernels and torch) or cuda (the Triton kernels on a CUDA GPU; without one, "
        "under TRITON_INTERPRET=1 on the CPU, for testing)",
    )
    p.add_argument(
        "--softmax",
        choices=("auto", "exact", "unified"),
        default="auto",
        help="attention softmax: exact, unified (FlashDecoding++'s unified max value), or auto "
        "(unified when `flashdecode calibrate` has calibrated the model)",
    )
    p.add_argument(
        "--dataflow",
        choices=("auto", "off"),
        default="auto",
        help="linear kernels: auto (the table `flashdecode tune` wrote for this machine, else the default "
        "plan) or off (one fixed kernel per weight format)",
    )
    p.add_argument(
        "--quantization",
        choices=("int8", "int4"),
        default=None,
        help="quantize float weights at load: int8 (Q8_0) or int4 (Q4_1), group size 32",
    )
    p.add_argument(
        "--numerics",
        choices=NUMERICS_MODES,
        default="auto",
        help="auto: for quantized GGUF weights, int8 activations and a 16-bit KV cache where held-out "
        "perplexity stays within 0.5%% of exact (checked once per model); exact: stored weights, fp32 "
        "activations, KV cache in the compute dtype",
    )
    p.add_argument("--exact", dest="numerics", action="store_const", const="exact", help="--numerics exact")
    p.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default="auto",
        help="KV cache storage: auto (per --numerics), f16, bf16, int8 (per-token scales)",
    )
    add_speculative_arg(p)
    add_parallel_args(p)


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        metavar="T",
        help="split the model over T ranks (tensor parallelism over gloo): spawned on this machine, or "
        "the ranks torchrun launched (torchrun --nproc-per-node T -m flashdecode ...); each rank "
        "defaults to its share of the machine's cores",
    )
    p.add_argument(
        "--pipeline-parallel-size",
        type=int,
        default=1,
        metavar="P",
        help="split the model's layers into P contiguous stages (pipeline parallelism over gloo), each "
        "of T ranks: T * P ranks in all (torchrun --nproc-per-node T*P)",
    )


def speculative_json(text: str) -> dict[str, Any]:
    """``--speculative`` as vLLM's ``--speculative-config``: a JSON object of SpeculativeConfig fields."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}): {text!r}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def add_speculative_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--speculative",
        type=speculative_json,
        default=None,
        metavar="JSON",
        help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_max": 3, "prompt_lookup_min": 1}\' (n-gram prompt lookup; default: off)',
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def add_commands(sub: Any) -> None:
    """``generate``, ``chat`` and ``info`` on the top-level parser's subcommands."""
    gen = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout")
    gen.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read stdin)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_model_args(gen)
    _add_sampling_args(gen)
    gen.set_defaults(run=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat in the terminal")
    chat.add_argument("--system", default=None, help="system prompt")
    add_model_args(chat)
    _add_sampling_args(chat)
    chat.set_defaults(run=cmd_chat)

    info = sub.add_parser("info", help="describe a model: architecture, size, formats, context")
    info.add_argument("--model", default=None)
    info.set_defaults(run=cmd_info)


def _make_llm(args: argparse.Namespace) -> Any:
    return LLM(
        model=args.model,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        num_threads=args.threads,
        softmax=args.softmax,
        dataflow=args.dataflow,
        quantization=args.quantization,
        device=args.device,
        numerics=args.numerics,
        kv_cache_dtype=args.kv_cache_dtype,
        speculative=args.speculative,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
    )


def _sampling(args: argparse.Namespace) -> Any:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )


def stream_text(llm: Any, prompt: Any, params: Any) -> Iterator[str]:
    """Yield the text of one request as the engine produces it."""
    engine = llm.engine
    request_id = f"cli-{id(prompt)}"
    engine.add_request(request_id, prompt, params)
    emitted = 0
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                text = out.outputs[0].text
                if len(text) > emitted:
                    yield text[emitted:]
                    emitted = len(text)
    finally:
        engine.abort(request_id)


def _chat_prompt(llm: Any, messages: list[dict[str, str]]) -> dict[str, Any]:
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    return {"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)}


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    llm = _make_llm(args)
    request = _chat_prompt(llm, [{"role": "user", "content": prompt}]) if args.chat else prompt
    for piece in stream_text(llm, request, _sampling(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _make_llm(args)
    params = _sampling(args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("flashdecode chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = []
        for piece in stream_text(llm, _chat_prompt(llm, messages), params):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def _experts(spec: ModelSpec) -> str:
    shared = spec.shared_expert_intermediate_size
    return (
        f"{spec.num_experts} of {spec.moe_intermediate_size} wide, top {spec.num_experts_per_tok} per token"
        + (f", a shared expert {shared} wide" if shared else "")
    )


def cmd_info(args: argparse.Namespace) -> int:
    loaded = load_model(args.model)
    spec = loaded.spec
    formats = Counter(loaded.formats.values())
    rows = [
        ("source", loaded.source),
        ("architecture", spec.family.name),
        ("parameters", f"{spec.num_parameters():,}"),
        ("layers", spec.num_layers),
        ("hidden size", spec.hidden_size),
        ("attention heads", f"{spec.num_heads} (kv {spec.num_kv_heads}, head dim {spec.head_dim})"),
        ("intermediate size", spec.intermediate_size),
        *([("experts", _experts(spec))] if spec.family.moe else []),
        ("vocabulary", spec.vocab_size),
        ("context length", spec.max_position),
        (
            "rope",
            f"theta {spec.rope_theta:g}"
            + (f", {spec.rope_scaling.kind} scaling" if spec.rope_scaling else ""),
        ),
        ("tied embeddings", "yes" if spec.tie_embeddings else "no"),
        ("features", "; ".join(spec.features()) or "none"),
        ("tensor formats", ", ".join(f"{name} x{count}" for name, count in formats.most_common())),
        ("chat template", "yes" if loaded.tokenizer.chat_template else "no"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
