"""A roofline model of this machine and of a model running on it.

Decode cannot beat memory bandwidth divided by the bytes one step must read; prefill cannot beat the
machine's matmul throughput divided by the FLOPs per token. This module holds both sides:

* ``Ceilings``: the machine's measured memory read bandwidth and matmul throughput per dtype (fp32,
  bf16, int8), measured once and cached (``machine_ceilings``; ``tools/probe.py`` measures).
* ``ModelCost``: bytes and FLOPs of one decode step at batch B and context L, and of a prefill, from
  the ``ModelSpec`` and each weight's *stored* format (Q4_1 = 20 bytes per 32 weights, ...), whatever
  the engine happens to keep in memory today: the bound is the one physics sets for that file.

What is counted (the same arithmetic ``tests/test_roofline.py`` checks by hand):

* weights: every matrix and vector of every layer, the final norm and the output head (the embedding
  matrix when tied), once per step however large the batch, plus one embedding row per token;
* KV cache: each sequence reads the K and V of all ``context`` positions in every layer, a sliding
  layer's at most its window's (so decode bytes grow with context, up to the windows; GQA shrinks
  them by num_heads / num_kv_heads) and writes its new ones;
  a prefill reads each K/V once (a flash-attention tiling) and writes all of them;
* activations: each projection reads its input and writes its output in the compute dtype, the head
  writes fp32 logits; only the last prompt position of a prefill goes through the head;
* FLOPs: 2 per multiply-add of every projection, plus attention's QK^T and PV (4 * heads * head_dim
  per attended position); norms, RoPE, softmax and the sampler are left out (they are O(hidden)).
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ..config import EngineConfig
from ..errors import FlashDecodeError
from ..kernels.formats import bytes_per_weight, canonical, is_quantized
from ..layers.kv_cache import KVCache
from ..models.gguf_loader import describe_gguf
from ..models.loader import load_model, resolve_model_path
from ..models.spec import ModelSpec
from ..models.tensor_parallel import local_spec
from ..utils.cpuinfo import cpu_model, physical_cores
from ..utils.formatting import fmt_bytes, fmt_rate, format_table, parse_int_list
from ..utils.paths import cache_dir, read_json, write_json, write_report
from . import probe

CACHE_FILE = "ceilings.json"
CACHE_VERSION = 2  # 2: the int8 ceiling counts the native int8 kernel

# --- the machine -------------------------------------------------------------------------------------

KV_DTYPE_CHOICES = ("auto", "fp32", "f16", "bf16", "int8")


@dataclass
class Ceilings:
    """What this machine can do: memory read bandwidth (bytes/s) and matmul FLOP/s per dtype."""

    bandwidth: float
    flops: dict[str, float]
    threads: int
    cpu: str = ""
    measured_at: str = ""
    bandwidth_fresh: bool = False  # measured in this process (it can be bimodal between processes)

    def peak(self, compute: str) -> float:
        """The matmul ceiling for weights computed as ``compute``: any weight can also be dequantized
        and multiplied with fp32 FMAs (as the flat GEMM does), so the faster of the two bounds it."""
        value = max(self.flops.get(compute, 0.0), self.flops.get("fp32", 0.0))
        if value <= 0:
            raise FlashDecodeError(f"no measured matmul throughput for {compute!r} on this machine")
        return value

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _cache_key(threads: int) -> str:
    return f"{cpu_model()}|{threads} threads|torch {torch.__version__}|{platform.machine()}"


def machine_ceilings(
    num_threads: int | None = None, refresh: bool = False, fresh_bandwidth: bool = False
) -> Ceilings:
    """This machine's ceilings with ``num_threads`` threads (default: physical cores), measured once
    and cached in the cache directory; ``refresh`` measures everything again, ``fresh_bandwidth``
    re-measures only the memory bandwidth in this process (about a second) and does not cache it."""
    threads = num_threads or physical_cores()
    key = _cache_key(threads)
    cached = read_json(cache_dir() / CACHE_FILE) or {}
    entry = cached.get(key) if cached.get("version") == CACHE_VERSION else None
    if refresh or entry is None:
        entry = {
            "bandwidth": probe.measure_memory_bandwidth(threads),
            "flops": {dtype: probe.measure_matmul_flops(dtype, threads) for dtype in probe.MATMUL_DTYPES},
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        if cached.get("version") != CACHE_VERSION:
            cached = {"version": CACHE_VERSION}
        cached[key] = entry
        try:
            write_json(cache_dir() / CACHE_FILE, cached)
        except OSError:
            pass  # a read-only cache directory only costs a re-measurement next time
        fresh = True
    else:
        fresh = False
    bandwidth = entry["bandwidth"]
    if fresh_bandwidth and not fresh:
        bandwidth, fresh = probe.measure_memory_bandwidth(threads), True
        if bandwidth > entry["bandwidth"]:  # the cache keeps the best this machine has shown
            entry["bandwidth"] = bandwidth
            try:
                write_json(cache_dir() / CACHE_FILE, cached)
            except OSError:
                pass
    return Ceilings(
        bandwidth=bandwidth,
        flops=dict(entry["flops"]),
        threads=threads,
        cpu=cpu_model(),
        measured_at=entry["measured_at"],
        bandwidth_fresh=fresh,
    )


# --- the model ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepCost:
    """Bytes moved and FLOPs done by one engine step that yields ``tokens`` tokens."""

    tokens: int
    flops: float
    weight_bytes: float
    kv_read_bytes: float
    kv_write_bytes: float
    activation_bytes: float

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_read_bytes + self.kv_write_bytes + self.activation_bytes

    @property
    def intensity(self) -> float:
        """Arithmetic intensity: FLOPs per byte moved."""
        return self.flops / self.bytes

    def memory_time(self, ceilings: Ceilings) -> float:
        return self.bytes / ceilings.bandwidth

    def compute_time(self, ceilings: Ceilings, compute: str) -> float:
        return self.flops / ceilings.peak(compute)

    def time_bound(self, ceilings: Ceilings, compute: str) -> float:
        """The least time the step can take: it must both move its bytes and do its FLOPs."""
        return max(self.memory_time(ceilings), self.compute_time(ceilings, compute))

    def tokens_per_s(self, ceilings: Ceilings, compute: str) -> float:
        return self.tokens / self.time_bound(ceilings, compute)

    def limit(self, ceilings: Ceilings, compute: str) -> str:
        return "memory" if self.memory_time(ceilings) >= self.compute_time(ceilings, compute) else "compute"

    def per_token(self) -> dict[str, float]:
        return {
            "flops": self.flops / self.tokens,
            "bytes": self.bytes / self.tokens,
            "weight_bytes": self.weight_bytes / self.tokens,
            "kv_read_bytes": self.kv_read_bytes / self.tokens,
        }


_LAYER_MATRICES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class ModelCost:
    """Bytes and FLOPs of a model's decode steps and prefills.

    ``formats`` maps canonical weight names (``LoadedModel.formats``) to stored formats; a weight
    missing from it is taken as ``default_format``. ``kv_bytes_per_token`` is the KV cache's bytes per
    cached token over all layers, K and V (default: the compute dtype's itemsize per element);
    ``activation_bytes`` is the compute dtype's itemsize."""

    spec: ModelSpec
    formats: Mapping[str, str] = field(default_factory=dict)
    activation_bytes: int = 4
    kv_bytes_per_token: float | None = None
    default_format: str = "F32"

    def __post_init__(self) -> None:
        if self.kv_bytes_per_token is None:
            s = self.spec
            self.kv_bytes_per_token = 2 * s.num_layers * s.kv_size * self.activation_bytes

    # shapes and bytes of the weights

    def matrix_shapes(self) -> dict[str, tuple[int, int]]:
        """Every matrix one token goes through (the head included, the embedding gather not)."""
        tensors = self.spec.tensors()
        shapes = {n: shape for n, shape in tensors.items() if n in self.spec.matrices() and n != "embed"}
        shapes["lm_head"] = tensors["embed"]  # the tied head reads the embedding matrix
        return shapes

    def vector_sizes(self) -> dict[str, int]:
        """Every norm weight and bias, read once per step."""
        matrices = self.spec.matrices()
        return {n: math.prod(shape) for n, shape in self.spec.tensors().items() if n not in matrices}

    def format_of(self, name: str) -> str:
        if name == "lm_head" and (self.spec.tie_embeddings or "lm_head" not in self.formats):
            name = "embed"
        return self.formats.get(name, self.default_format)

    def weight_bytes(self, name: str, numel: int) -> float:
        return numel * bytes_per_weight(self.format_of(name))

    def expert_share(self, name: str, tokens: float) -> float:
        """The share of weight ``name`` a step of ``tokens`` tokens reads: 1, except for a routed
        expert's, which it reads where at least one token chose that expert: with top-k of n routed
        uniformly, 1 - (1 - k/n) ** tokens (k/n at one token: only the active experts' bytes).
        ``tokens`` 0: the expected share of one token's multiply-adds, k/n."""
        if ".experts." not in name:
            return 1.0
        chosen = self.spec.num_experts_per_tok / self.spec.num_experts
        return chosen if tokens == 0 else 1.0 - (1.0 - chosen) ** tokens

    def matmul_params(self, head: bool = True) -> int:
        """Multiply-adds per token of the layers' projections (and of the head, with ``head``); a
        token runs only its top-k experts."""
        return round(
            sum(
                r * c * self.expert_share(n, 0)
                for n, (r, c) in self.matrix_shapes().items()
                if head or n != "lm_head"
            )
        )

    def resident_weight_bytes(self, tokens: int = 1) -> float:
        """Bytes a step of ``tokens`` tokens reads for the weights, the embedding gather aside (an MoE
        model's routed experts only where some token chose them: ``expert_share``)."""
        total = sum(
            self.weight_bytes(n, r * c) * self.expert_share(n, tokens)
            for n, (r, c) in self.matrix_shapes().items()
        )
        return total + sum(self.weight_bytes(n, size) for n, size in self.vector_sizes().items())

    def embedding_row_bytes(self) -> float:
        return self.spec.hidden_size * bytes_per_weight(self.format_of("embed"))

    def activation_bytes_per_token(self, head: bool = True) -> float:
        s = self.spec
        h, q, kv = s.hidden_size, s.q_size, s.kv_size
        elems = 0
        for i in range(s.num_layers):
            # gated MLPs of this layer (width, how many a token runs); an MoE layer's router: h in, n out
            mlps, router = [(s.intermediate_size, 1)], 0
            if s.moe_at(i):
                mlps = [
                    (s.moe_intermediate_size, s.num_experts_per_tok),
                    (s.shared_expert_intermediate_size, 1),
                ]
                router = h + s.num_experts
            # qkv: h in, q+2kv out; o: q in, h out; gate/up: h in, 2*inter out; down: inter in, h out
            mlp = sum(n * ((h + 2 * inter) + (inter + h)) for inter, n in mlps if inter)
            elems += (h + q + 2 * kv) + (q + h) + router + mlp
        total = elems * self.activation_bytes
        if head:
            total += h * self.activation_bytes + s.vocab_size * 4  # fp32 logits
        return total

    def attention_flops(self, attended: int) -> float:
        """QK^T and PV of one query position over ``attended`` positions, all layers."""
        s = self.spec
        return 4.0 * s.num_layers * s.num_heads * s.head_dim * attended

    def layer_mean_attended(self, context: int) -> float:
        """Positions a decode row at ``context`` attends to, averaged over the layers: ``context``,
        or at most its window on a sliding layer."""
        s = self.spec
        return sum(min(context, s.window_at(i) or context) for i in range(s.num_layers)) / s.num_layers

    # the two kinds of step

    def decode_step(self, batch: int, context: int | Iterable[int]) -> StepCost:
        """One decode step of ``batch`` sequences, each attending to ``context`` positions (its new
        token included); ``context`` may also list one length per sequence."""
        contexts = [context] * batch if isinstance(context, int) else list(context)
        if len(contexts) != batch or batch < 1 or min(contexts) < 1:
            raise FlashDecodeError(f"decode_step: batch={batch} with contexts {contexts[:4]}...")
        attended = sum(self.layer_mean_attended(c) for c in contexts)
        return StepCost(
            tokens=batch,
            flops=2.0 * batch * self.matmul_params() + self.attention_flops(attended),
            weight_bytes=self.resident_weight_bytes(batch) + batch * self.embedding_row_bytes(),
            kv_read_bytes=attended * self.kv_bytes_per_token,
            kv_write_bytes=batch * self.kv_bytes_per_token,
            activation_bytes=batch * self.activation_bytes_per_token(),
        )

    def prefill(self, prompt_len: int, batch: int = 1) -> StepCost:
        """Prefill of ``batch`` prompts of ``prompt_len`` tokens each, weights read once, causal
        attention, the head run on each prompt's last position only."""
        if prompt_len < 1 or batch < 1:
            raise FlashDecodeError(f"prefill: prompt_len={prompt_len}, batch={batch} must be positive")
        tokens = batch * prompt_len
        head_params = self.spec.vocab_size * self.spec.hidden_size
        causal = prompt_len * (prompt_len + 1) // 2  # positions attended, summed over the prompt
        return StepCost(
            tokens=tokens,
            flops=2.0 * tokens * self.matmul_params(head=False)
            + 2.0 * batch * head_params
            + batch * self.attention_flops(causal),
            weight_bytes=self.resident_weight_bytes(tokens) + tokens * self.embedding_row_bytes(),
            kv_read_bytes=tokens * self.kv_bytes_per_token,
            kv_write_bytes=tokens * self.kv_bytes_per_token,
            activation_bytes=tokens * self.activation_bytes_per_token(head=False)
            + batch * (self.activation_bytes_per_token() - self.activation_bytes_per_token(head=False)),
        )

    def compute_dtype(self) -> str:
        """The matmul ceiling that applies: int8 (VNNI dot products, as llama.cpp runs quantized
        blocks) when most weight bytes are quantized blocks, bf16 for 16-bit weights, else fp32."""
        by_kind = {"int8": 0.0, "bf16": 0.0, "fp32": 0.0}
        for name, (r, c) in self.matrix_shapes().items():
            fmt = self.format_of(name)
            kind = "int8" if is_quantized(fmt) else "bf16" if canonical(fmt) == "BF16" else "fp32"
            by_kind[kind] += self.weight_bytes(name, r * c)
        return max(by_kind, key=lambda k: by_kind[k])

    def stored_format_summary(self) -> str:
        counts: dict[str, int] = {}
        for name in self.matrix_shapes():
            fmt = self.format_of(name)
            counts[fmt] = counts.get(fmt, 0) + 1
        return ", ".join(f"{fmt} x{n}" for fmt, n in sorted(counts.items(), key=lambda kv: -kv[1]))


# --- beyond one machine -------------------------------------------------------------------------------

LINK_GBIT = 25.0  # the network the parallel prediction assumes unless told: 25 Gbit/s Ethernet
LINK_LATENCY_US = 30.0  # one message's latency over it (TCP through gloo, a switch between machines)


@dataclass(frozen=True)
class Link:
    """The network between ranks: bandwidth in bytes/s, and the latency of one message in seconds."""

    bandwidth: float
    latency: float

    @classmethod
    def from_gbit(cls, gbit: float, latency_us: float) -> Link:
        if gbit <= 0 or latency_us < 0:
            raise FlashDecodeError(
                f"a link of {gbit} Gbit/s and {latency_us} us: the bandwidth must be positive and the "
                "latency not negative"
            )
        return cls(gbit * 1e9 / 8, latency_us * 1e-6)


@dataclass(frozen=True)
class CommCost:
    """What one rank sends in one step: how many messages, and their bytes."""

    messages: int = 0
    bytes: float = 0.0

    def __add__(self, other: CommCost) -> CommCost:
        return CommCost(self.messages + other.messages, self.bytes + other.bytes)

    def __mul__(self, times: int) -> CommCost:
        return CommCost(self.messages * times, self.bytes * times)

    def time(self, link: Link) -> float:
        return self.messages * link.latency + self.bytes / link.bandwidth


def ring_all_reduce(payload: float, ranks: int) -> CommCost:
    """A ring all-reduce of ``payload`` bytes: a reduce-scatter and an all-gather, each rank sending
    ranks - 1 chunks of payload / ranks in each."""
    if ranks == 1:
        return CommCost()
    return CommCost(2 * (ranks - 1), 2 * (ranks - 1) / ranks * payload)


def ring_all_gather(gathered: float, ranks: int) -> CommCost:
    """A ring all-gather whose result is ``gathered`` bytes: each rank forwards the ranks - 1 parts
    that are not its own."""
    if ranks == 1:
        return CommCost()
    return CommCost(ranks - 1, (ranks - 1) / ranks * gathered)


@dataclass(frozen=True)
class ParallelStep:
    """One decode step over ``tensor_parallel`` x ``pipeline_parallel`` ranks, each on its own machine
    with the same ceilings. The collectives block the step (the engine overlaps nothing), so their
    time adds to the compute's; the stages run one after another for one step, or all at once on
    ``pipeline_parallel`` micro-batches in flight, when the slowest stage (the last: its layers and
    the head) sets the pace."""

    tensor_parallel: int
    pipeline_parallel: int
    shard: StepCost  # one tensor-parallel rank's shard of every layer and of the head (all stages)
    stage: StepCost  # the last stage's part of it
    tp_comm: CommCost  # the collectives of one step, all stages
    stage_tp_comm: CommCost  # the last stage's
    pp_comm: CommCost  # one stage boundary's activation sends, one a micro-batch
    logits_comm: CommCost = CommCost()  # the last stage's logits to rank 0, one send a micro-batch

    @property
    def comm(self) -> CommCost:
        """What a rank of the last stage sends per step: its collectives and the logits' sends."""
        return self.stage_tp_comm + self.logits_comm

    def comm_time(self, link: Link) -> float:
        """A step's time on the network: every stage's collectives, every boundary's sends and the
        logits' way back to rank 0."""
        sends = (self.pipeline_parallel - 1) * self.pp_comm.time(link) + self.logits_comm.time(link)
        return self.tp_comm.time(link) + sends

    def step_time(self, ceilings: Ceilings, link: Link, compute: str) -> float:
        """One step of the batch through every stage in turn and across every boundary."""
        return self.shard.time_bound(ceilings, compute) + self.comm_time(link)

    def tokens_per_s(self, ceilings: Ceilings, link: Link, compute: str) -> float:
        """One step in flight at a time."""
        return self.shard.tokens / self.step_time(ceilings, link, compute)

    def pipelined_tokens_per_s(self, ceilings: Ceilings, link: Link, compute: str) -> float:
        """``pipeline_parallel`` micro-batches of the batch in flight: every stage busy, the slowest
        stage, its collectives and its send set the pace."""
        stage = self.stage.time_bound(ceilings, compute) + self.stage_tp_comm.time(link)
        return self.stage.tokens / (stage + self.pp_comm.time(link) + self.logits_comm.time(link))


def parallel_decode_step(
    cost: ModelCost, batch: int, context: int, tensor_parallel: int = 1, pipeline_parallel: int = 1
) -> ParallelStep:
    """The cost of one decode step per rank under tensor parallelism (Megatron's shards: each rank
    reads 1/T of the sharded weights and of the KV heads, KV heads replicated past their count) and
    pipeline parallelism (contiguous stages of layers / P layers; the last stage's counted as the
    first layers / P, with their formats and windows).

    Per step the ranks all-reduce the hidden states after the vocabulary-parallel embedding and
    after o and after down in every layer, and all-gather the fp32 logits. Under pipeline parallelism
    the engine cuts a step into up to P micro-batches of whole sequences (engine/parallel/pipeline.py),
    each crossing every boundary in a send of its own, and the last stage sends each one's fp32 logits
    back to rank 0: one message a micro-batch, the same bytes in all. The two broadcasts of the
    step's int64 metadata are left out (a few bytes per row beside the layers' all-reduces)."""
    s, t, p = cost.spec, tensor_parallel, pipeline_parallel
    if t < 1 or p < 1:
        raise FlashDecodeError(f"tensor_parallel_size={t} and pipeline_parallel_size={p} must be positive")
    if s.num_layers % p:
        raise FlashDecodeError(
            f"pipeline_parallel_size={p} does not divide the model's {s.num_layers} layers"
        )
    shard_spec = local_spec(s, t)
    stage_spec = shard_spec.with_(num_layers=s.num_layers // p)
    hidden = batch * s.hidden_size * cost.activation_bytes
    gather = ring_all_gather(batch * s.vocab_size * 4, t)
    stage_reductions = 2 * stage_spec.num_layers + (1 if p == 1 else 0)
    sends = min(p, batch)  # micro-batches: a decode step's sequences are one row each
    return ParallelStep(
        t,
        p,
        shard=_shard_cost(cost, shard_spec).decode_step(batch, context),
        stage=_shard_cost(cost, stage_spec).decode_step(batch, context),
        tp_comm=ring_all_reduce(hidden, t) * (2 * s.num_layers + 1) + gather,
        stage_tp_comm=ring_all_reduce(hidden, t) * stage_reductions + gather,
        pp_comm=CommCost(sends, hidden) if p > 1 else CommCost(),
        logits_comm=CommCost(sends, batch * s.vocab_size * 4) if p > 1 else CommCost(),
    )


def _shard_cost(cost: ModelCost, part: ModelSpec) -> ModelCost:
    """``cost`` over ``part`` of its model: fewer heads, MLP columns, vocabulary rows or layers."""
    s = cost.spec
    kv_share = part.num_layers * part.num_kv_heads / (s.num_layers * s.num_kv_heads)
    return replace(cost, spec=part, kv_bytes_per_token=cost.kv_bytes_per_token * kv_share)


def model_cost_for_engine(engine: Any) -> ModelCost:
    """The cost model of a running ``LLMEngine``: its spec, stored formats, compute dtype and KV cache."""
    itemsize = engine.dtype.itemsize
    return ModelCost(
        spec=engine.spec,
        formats=dict(engine.formats),
        activation_bytes=itemsize,
        kv_bytes_per_token=engine.cache.bytes_per_slot,
    )


def describe_model(model: str | None) -> tuple[ModelSpec, dict[str, str], str]:
    """(spec, stored formats, source) of a model without building an engine; a GGUF file is read for
    its header only (no tensor data)."""
    path = resolve_model_path(model)
    if path.is_file():
        spec, formats = describe_gguf(path)
        return spec, formats, str(path)
    loaded = load_model(model)
    return loaded.spec, dict(loaded.formats), loaded.source


# --- reports -----------------------------------------------------------------------------------------


def describe_ceilings(c: Ceilings) -> str:
    where = "measured in this process" if c.bandwidth_fresh else f"cached, measured {c.measured_at}"
    flops = ", ".join(f"{k} {v / 1e9:,.0f}" for k, v in c.flops.items() if v > 0)
    return (
        f"machine: {c.cpu}, {c.threads} threads\n"
        f"  memory read bandwidth  {c.bandwidth / 1e9:.1f} GB/s ({where})\n"
        f"  matmul GFLOP/s         {flops}"
    )


def roofline_report(
    cost: ModelCost,
    ceilings: Ceilings,
    source: str,
    batches: Iterable[int],
    context: int,
    prompt_lens: Iterable[int],
    compute: str | None = None,
) -> dict[str, Any]:
    """Decode and prefill bounds as rows (also the JSON of ``flashdecode roofline --json``)."""
    compute = compute or cost.compute_dtype()
    s = cost.spec
    decode = []
    for b in batches:
        step = cost.decode_step(b, context)
        decode.append(
            {
                "batch": b,
                "context": context,
                "bytes": step.bytes,
                "kv_read_bytes": step.kv_read_bytes,
                "flops": step.flops,
                "intensity": step.intensity,
                "tokens_per_s": step.tokens_per_s(ceilings, compute),
                "limit": step.limit(ceilings, compute),
            }
        )
    prefill = []
    for p in prompt_lens:
        step = cost.prefill(p)
        prefill.append(
            {
                "prompt_len": p,
                "bytes_per_token": step.bytes / step.tokens,
                "flops_per_token": step.flops / step.tokens,
                "intensity": step.intensity,
                "tokens_per_s": step.tokens_per_s(ceilings, compute),
                "limit": step.limit(ceilings, compute),
            }
        )
    return {
        "model": {
            "source": source,
            "architecture": s.family.name
            + (f" (top {s.num_experts_per_tok} of {s.num_experts} experts)" if s.family.moe else ""),
            "parameters": s.num_parameters(),
            "layers": s.num_layers,
            "hidden": s.hidden_size,
            "heads": s.num_heads,
            "kv_heads": s.num_kv_heads,
            "stored_formats": cost.stored_format_summary(),
            "weight_bytes_per_step": cost.resident_weight_bytes(),
            "kv_bytes_per_token": cost.kv_bytes_per_token,
        },
        "ceilings": ceilings.to_json(),
        "compute": compute,
        "decode": decode,
        "prefill": prefill,
    }


def parallel_report(
    cost: ModelCost,
    ceilings: Ceilings,
    link: Link,
    batches: Iterable[int],
    context: int,
    tensor_parallel: int,
    pipeline_parallel: int,
    compute: str | None = None,
) -> dict[str, Any]:
    """Decode over ``tensor_parallel`` x ``pipeline_parallel`` ranks beside one rank, as rows (the
    ``parallel`` part of ``flashdecode roofline --json``)."""
    compute = compute or cost.compute_dtype()
    rows = []
    for b in batches:
        one = cost.decode_step(b, context).tokens_per_s(ceilings, compute)
        step = parallel_decode_step(cost, b, context, tensor_parallel, pipeline_parallel)
        rate = step.tokens_per_s(ceilings, link, compute)
        pipelined = step.pipelined_tokens_per_s(ceilings, link, compute)
        rows.append(
            {
                "batch": b,
                "bytes_per_rank": step.stage.bytes,
                "comm_bytes_per_rank": step.comm.bytes,
                "messages_per_rank": step.comm.messages,
                "step_s": step.step_time(ceilings, link, compute),
                "comm_s": step.comm_time(link),
                "comm_share": step.comm_time(link) / step.step_time(ceilings, link, compute),
                "one_rank_tokens_per_s": one,
                "tokens_per_s": rate,
                "pipelined_tokens_per_s": pipelined,
                "speedup": max(rate, pipelined) / one,
            }
        )
    return {
        "tensor_parallel_size": tensor_parallel,
        "pipeline_parallel_size": pipeline_parallel,
        "link_bytes_per_s": link.bandwidth,
        "link_latency_s": link.latency,
        "context": context,
        "decode": rows,
    }


def print_parallel_report(report: dict[str, Any]) -> None:
    t, p = report["tensor_parallel_size"], report["pipeline_parallel_size"]
    print(
        f"\ndecode over {t} x {p} ranks (tensor x pipeline), one machine each, at context "
        f"{report['context']}; link {report['link_bytes_per_s'] * 8 / 1e9:g} Gbit/s, "
        f"{report['link_latency_s'] * 1e6:g} us per message:"
    )
    rows = [
        [
            str(r["batch"]),
            fmt_bytes(r["bytes_per_rank"]),
            fmt_bytes(r["comm_bytes_per_rank"]),
            str(r["messages_per_rank"]),
            f"{r['step_s'] * 1e3:.3g}",
            f"{r['comm_share']:.0%}",
            fmt_rate(r["one_rank_tokens_per_s"]),
            fmt_rate(r["tokens_per_s"]),
            fmt_rate(r["pipelined_tokens_per_s"]),
            f"{r['speedup']:.2f}x",
        ]
        for r in report["decode"]
    ]
    headers = ["batch", "bytes/rank", "sent/rank", "messages", "step ms", "comm", "1 rank tok/s"]
    headers += ["max tok/s", "pipelined", "speedup"]
    print(format_table(headers, rows))


def print_roofline_report(report: dict[str, Any], ceilings: Ceilings) -> None:
    m = report["model"]
    print(describe_ceilings(ceilings))
    print(
        f"model: {m['source']}\n"
        f"  {m['architecture']}, {m['parameters']:,} parameters, {m['layers']} layers, hidden {m['hidden']}, "
        f"{m['heads']} heads ({m['kv_heads']} KV)\n"
        f"  stored formats of the matrices: {m['stored_formats']}\n"
        f"  weights read per step {fmt_bytes(m['weight_bytes_per_step'])}, "
        f"KV cache {fmt_bytes(m['kv_bytes_per_token'])} per token; matmul ceiling: {report['compute']}"
    )
    context = report["decode"][0]["context"] if report["decode"] else 0
    print(f"\ndecode, each sequence at context {context}:")
    rows = [
        [
            str(r["batch"]),
            fmt_bytes(r["bytes"]),
            fmt_bytes(r["kv_read_bytes"]),
            f"{r['flops'] / 1e9:.3g}",
            f"{r['intensity']:.3g}",
            fmt_rate(r["tokens_per_s"]),
            r["limit"],
        ]
        for r in report["decode"]
    ]
    print(
        format_table(["batch", "bytes/step", "KV read", "GFLOP/step", "FLOP/B", "max tok/s", "bound"], rows)
    )
    print("\nprefill, one prompt:")
    rows = [
        [
            str(r["prompt_len"]),
            fmt_bytes(r["bytes_per_token"]),
            f"{r['flops_per_token'] / 1e6:,.0f}",
            f"{r['intensity']:.3g}",
            fmt_rate(r["tokens_per_s"]),
            r["limit"],
        ]
        for r in report["prefill"]
    ]
    print(format_table(["prompt", "bytes/token", "MFLOP/token", "FLOP/B", "max tok/s", "bound"], rows))


def plot_roofline(
    path: str,
    cost: ModelCost,
    ceilings: Ceilings,
    batches: Iterable[int],
    context: int,
    prompt_lens: Iterable[int],
    measured: Iterable[tuple[str, float, float]] = (),
    title: str = "",
    compute: str | None = None,
) -> None:
    """The classic roofline (log-log, arithmetic intensity vs attainable FLOP/s): the bandwidth slope,
    one ceiling per measured matmul dtype, the model's decode steps and prefills placed at their
    intensity and bound, and ``measured`` points (label, intensity, achieved FLOP/s)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FlashDecodeError("--plot needs matplotlib: pip install matplotlib") from None
    compute = compute or cost.compute_dtype()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    peaks = {k: v for k, v in ceilings.flops.items() if v > 0}
    top = max(peaks.values(), default=ceilings.bandwidth * 100)
    xs = [10 ** (i / 20) for i in range(-20, 81)]  # 0.1 .. 10^4 FLOP/byte
    ax.plot(xs, [min(top, ceilings.bandwidth * x) / 1e9 for x in xs], color="black", lw=1.5)
    ax.text(
        0.15,
        ceilings.bandwidth * 0.2 / 1e9,
        f"{ceilings.bandwidth / 1e9:.0f} GB/s",
        rotation=30,
        fontsize=9,
    )
    for i, (dtype, peak) in enumerate(sorted(peaks.items(), key=lambda kv: kv[1])):
        ridge = peak / ceilings.bandwidth
        ax.plot([ridge, xs[-1]], [peak / 1e9] * 2, ls="--", lw=1, color=f"C{7 - i}")
        ax.text(xs[-1], peak / 1e9 * 1.05, f"{dtype} {peak / 1e9:,.0f} GFLOP/s", ha="right", fontsize=9)
    peak = ceilings.peak(compute)
    for i, b in enumerate(batches):  # labels alternate sides so neighbours do not overlap
        step = cost.decode_step(b, context)
        y = min(peak, ceilings.bandwidth * step.intensity) / 1e9
        ax.plot(step.intensity, y, "o", color="C0")
        offset = (6, -8) if i % 2 == 0 else (-40, 6)
        ax.annotate(f"B={b}", (step.intensity, y), textcoords="offset points", xytext=offset, fontsize=8)
    for i, p in enumerate(prompt_lens):
        step = cost.prefill(p)
        y = min(peak, ceilings.bandwidth * step.intensity) / 1e9
        ax.plot(step.intensity, y, "s", color="C1")
        offset = (-10, -14 - 10 * i)
        ax.annotate(
            f"prefill {p}", (step.intensity, y), textcoords="offset points", xytext=offset, fontsize=8
        )
    for i, (label, intensity, achieved) in enumerate(measured):
        ax.plot(intensity, achieved / 1e9, "x", color="C3", ms=8)
        offset = (6, -10) if i % 2 == 0 else (6, 4)
        ax.annotate(label, (intensity, achieved / 1e9), textcoords="offset points", xytext=offset, fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("attainable GFLOP/s")
    ax.set_title(title or f"roofline: {ceilings.cpu}, {ceilings.threads} threads", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.plot([], [], "o", color="C0", label=f"model decode (context {context}), bound")
    ax.plot([], [], "s", color="C1", label="model prefill, bound")
    if measured:
        ax.plot([], [], "x", color="C3", label="measured")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- command line ------------------------------------------------------------------------------------


def add_arguments(p: Any) -> None:
    p.add_argument("--model", default=None, help="GGUF file or Hugging Face folder (default: embedded)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="draw the roofline to this PNG")
    p.add_argument("--batch", default="1,2,4,8,16,32,64", help="decode batch sizes (default 1,2,...,64)")
    p.add_argument("--context", type=int, default=512, help="tokens each decoding sequence attends to")
    p.add_argument("--prompt-len", default="128,512,2048", help="prefill prompt lengths")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument(
        "--compute", default="auto", help="matmul ceiling: auto (from the formats), fp32, bf16, int8"
    )
    p.add_argument(
        "--kv-dtype", default="auto", help="KV cache element: auto (the compute dtype), fp32, f16, bf16, int8"
    )
    p.add_argument("--remeasure", action="store_true", help="measure the machine again (else cached)")
    p.add_argument(
        "--bench", default=None, metavar="FILE.json", help="place `flashdecode bench --json` points"
    )
    p.add_argument("--json", default=None, metavar="FILE", help="write the figures as JSON")
    p.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        metavar="T",
        help="also predict decode over T ranks of tensor parallelism, one machine each",
    )
    p.add_argument(
        "--pipeline-parallel-size",
        type=int,
        default=1,
        metavar="P",
        help="... and P pipeline stages (contiguous layers), one machine each",
    )
    p.add_argument(
        "--link-gbit",
        type=float,
        default=LINK_GBIT,
        help=f"network bandwidth between ranks (default {LINK_GBIT:g})",
    )
    p.add_argument(
        "--link-latency-us", type=float, default=LINK_LATENCY_US,
        help=f"latency of one message between ranks (default {LINK_LATENCY_US:g})",
    )  # fmt: skip


def _kv_bytes(spec: ModelSpec, kv_dtype: str, activation_bytes: int) -> float:
    """Bytes per cached token for ``--kv-dtype`` (auto: the compute dtype), as the KV cache stores it."""
    if kv_dtype not in KV_DTYPE_CHOICES:
        raise FlashDecodeError(f"--kv-dtype {kv_dtype!r}: expected one of {KV_DTYPE_CHOICES}")
    compute = torch.float32 if kv_dtype == "fp32" or activation_bytes == 4 else torch.bfloat16
    storage = "auto" if kv_dtype == "fp32" else kv_dtype
    return KVCache.bytes_per_token(spec.num_layers, spec.num_kv_heads, spec.head_dim, compute, storage)


def measured_points(bench: dict[str, Any], cost: ModelCost) -> list[tuple[str, float, float]]:
    """(label, intensity, achieved FLOP/s) of each cell of a ``flashdecode bench --json`` result."""
    points = []
    for c in bench.get("cells", []):
        b, p, g = c["batch"], c["prompt_len"], c["gen_len"]
        decode = cost.decode_step(b, p + g // 2)  # steps attend to p + 1 .. p + g - 1 keys
        rate = c["decode_tok_s"]["median"]
        points.append((f"bench decode B={b}, ctx {p}", decode.intensity, rate * decode.flops / decode.tokens))
        prefill = cost.prefill(p, batch=b)
        rate = c["prefill_tok_s"]["median"]
        points.append((f"bench prefill {b}x{p}", prefill.intensity, rate * prefill.flops / prefill.tokens))
    return points


def run(args: Any) -> int:
    batches = parse_int_list(args.batch, "--batch")
    prompt_lens = parse_int_list(args.prompt_len, "--prompt-len")
    (context,) = parse_int_list(args.context, "--context")
    if args.compute not in ("auto", *probe.MATMUL_DTYPES):
        raise FlashDecodeError(f"--compute {args.compute!r}: expected auto, fp32, bf16 or int8")
    if args.kv_dtype not in KV_DTYPE_CHOICES:
        raise FlashDecodeError(f"--kv-dtype {args.kv_dtype!r}: expected one of {KV_DTYPE_CHOICES}")
    if args.threads is not None:
        parse_int_list(args.threads, "--threads")
    bench = None
    if args.bench:
        try:
            with open(args.bench) as f:
                bench = json.load(f)
        except (OSError, ValueError) as exc:
            raise FlashDecodeError(f"--bench {args.bench}: not a readable bench JSON ({exc})") from None
    spec, formats, source = describe_model(args.model)
    activation_bytes = EngineConfig().torch_dtype(formats.get("embed", "")).itemsize
    cost = ModelCost(
        spec, formats, activation_bytes, kv_bytes_per_token=_kv_bytes(spec, args.kv_dtype, activation_bytes)
    )
    ceilings = machine_ceilings(args.threads, refresh=args.remeasure)
    compute = None if args.compute == "auto" else args.compute
    report = roofline_report(cost, ceilings, source, batches, context, prompt_lens, compute)
    (t,) = parse_int_list(args.tensor_parallel_size, "--tensor-parallel-size")
    (p,) = parse_int_list(args.pipeline_parallel_size, "--pipeline-parallel-size")
    if t * p > 1:  # before any report: a size the model cannot take is an error, not a half report
        link = Link.from_gbit(args.link_gbit, args.link_latency_us)
        report["parallel"] = parallel_report(cost, ceilings, link, batches, context, t, p, compute)
    print_roofline_report(report, ceilings)
    if "parallel" in report:
        print_parallel_report(report["parallel"])
    if args.json:
        write_report(args.json, report)
    if args.plot:
        points = [
            (f"probe {k} matmul", 2 * 2048 / 3 / {"fp32": 4, "bf16": 2, "int8": 1}[k], v)
            for k, v in ceilings.flops.items()
            if v > 0
        ]
        if bench is not None:
            points += measured_points(bench, cost)
        try:
            plot_roofline(args.plot, cost, ceilings, batches, context, prompt_lens, points, compute=compute)
        except OSError as exc:
            raise FlashDecodeError(f"--plot {args.plot}: {exc.strerror or exc}") from None
        print(f"\nwrote {args.plot}")
    return 0
