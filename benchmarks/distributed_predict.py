"""Predicted decode tokens/s of a 70B Llama over 1, 2, 4 and 8 machines, from the roofline's cost model.

    python benchmarks/distributed_predict.py [--link-gbit 25] [--link-latency-us 30] [--bandwidth-gbs B]

No model file is needed: the shape is Llama 3 70B's (80 layers, hidden 8192, 64 heads over 8 KV
heads, MLP 28672, vocabulary 128256, untied head), stored as bf16 or as llama.cpp's Q4_K_M mix
(``q4_k_m_formats``). Each machine has this machine's ceilings (``machine_ceilings``, cached) unless
``--bandwidth-gbs`` and ``--gflops`` give others. Prints the Markdown table docs/distributed.md holds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]  # this checkout's flashdecode

from flashdecode.config import EngineConfig  # noqa: E402
from flashdecode.models.spec import FAMILIES, ModelSpec  # noqa: E402
from flashdecode.tools.roofline import (  # noqa: E402
    LINK_GBIT,
    LINK_LATENCY_US,
    Ceilings,
    Link,
    ModelCost,
    machine_ceilings,
    parallel_decode_step,
)
from flashdecode.utils.formatting import fmt_bytes  # noqa: E402

LAYOUTS = [(1, 1), (2, 1), (4, 1), (8, 1), (1, 2), (1, 4), (1, 8), (2, 2), (4, 2), (2, 4)]  # (T, P)
BATCHES = (1, 8)


def llama_70b() -> ModelSpec:
    return ModelSpec(
        family=FAMILIES["llama"],
        vocab_size=128256,
        hidden_size=8192,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=28672,
        norm_eps=1e-5,
        rope_theta=500000.0,
        max_position=8192,
        tie_embeddings=False,
    )


def q4_k_m_formats(spec: ModelSpec) -> dict[str, str]:
    """llama.cpp's Q4_K_M (llama-quant.cpp): Q4_K, with Q6_K for the head and for v and down in the
    layers ``use_more_bits`` picks; a 70B's other v layers get Q5_K (its v is 8x smaller than q)."""
    n = spec.num_layers

    def more_bits(i: int) -> bool:
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

    formats = {"embed": "Q4_K", "lm_head": "Q6_K"}
    for i in range(n):
        more = more_bits(i)
        formats |= {f"layers.{i}.{m}": "Q4_K" for m in ("q", "k", "o", "gate", "up")}
        formats[f"layers.{i}.v"] = "Q6_K" if more else "Q5_K"
        formats[f"layers.{i}.down"] = "Q6_K" if more else "Q4_K"
        formats |= {f"layers.{i}.{norm}": "F32" for norm in ("attn_norm", "mlp_norm")}
    formats["norm"] = "F32"
    return formats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--link-gbit", type=float, default=LINK_GBIT)
    p.add_argument("--link-latency-us", type=float, default=LINK_LATENCY_US)
    p.add_argument("--context", type=int, default=512, help="tokens each decoding sequence attends to")
    p.add_argument("--threads", type=int, default=None, help="the ceilings' threads (default: all cores)")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="each machine's memory bandwidth")
    p.add_argument("--gflops", type=float, default=None, help="each machine's matmul ceiling, every dtype")
    args = p.parse_args()
    ceilings = machine_ceilings(args.threads)
    if args.bandwidth_gbs is not None or args.gflops is not None:
        bandwidth = ceilings.bandwidth if args.bandwidth_gbs is None else args.bandwidth_gbs * 1e9
        flops = ceilings.flops if args.gflops is None else dict.fromkeys(ceilings.flops, args.gflops * 1e9)
        ceilings = Ceilings(bandwidth, flops, ceilings.threads, "given")
    link = Link.from_gbit(args.link_gbit, args.link_latency_us)
    spec = llama_70b()
    q4_k_m = q4_k_m_formats(spec)
    costs = {  # activations in the dtype the engine computes each file in
        "Q4_K_M": ModelCost(spec, q4_k_m, EngineConfig().torch_dtype(q4_k_m["embed"]).itemsize),
        "bf16": ModelCost(
            spec, activation_bytes=EngineConfig().torch_dtype("BF16").itemsize, default_format="BF16"
        ),
    }
    headers = ["machines", "T x P"]
    for name in costs:
        headers += [f"{name} B={b} tok/s" for b in BATCHES] + [f"{name} B=1 comm"]
    rows = []
    for t, pp in LAYOUTS:
        row = [str(t * pp), f"{t} x {pp}"]
        for cost in costs.values():
            compute = cost.compute_dtype()
            for b in BATCHES:
                step = parallel_decode_step(cost, b, args.context, t, pp)
                rate = step.tokens_per_s(ceilings, link, compute)
                pipelined = step.pipelined_tokens_per_s(ceilings, link, compute)
                row.append(f"{rate:.3g}" if pp == 1 else f"{rate:.3g} ({pipelined:.3g})")
            one = parallel_decode_step(cost, 1, args.context, t, pp)
            row.append(f"{one.comm_time(link) / one.step_time(ceilings, link, compute):.0%}")
        rows.append(row)
    flops = max(ceilings.flops.values()) / 1e9
    weights = ", ".join(f"{name} {fmt_bytes(cost.resident_weight_bytes())}" for name, cost in costs.items())
    print(
        f"Llama 70B decode at context {args.context}, each machine {ceilings.bandwidth / 1e9:.1f} GB/s and "
        f"{flops:,.0f} GFLOP/s ({ceilings.cpu}), link {args.link_gbit:g} Gbit/s and {args.link_latency_us:g} "
        f"us per message; weights {weights}; pipelined rates in parentheses\n"
    )
    for line in [headers, ["---"] * len(headers), *rows]:
        print("| " + " | ".join(line) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
