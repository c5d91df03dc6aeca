"""How exactly the engine computes: the ``numerics`` option, and the held-out check behind its default.

``numerics="exact"``: every product uses exactly the stored weights with fp32 activations and
accumulation, and the KV cache holds the compute dtype (the transformers parity tests run this way).

``numerics="auto"`` (the default): for weights stored quantized in a GGUF file, what llama.cpp does
and GGUF users expect: activations rounded to int8 per 32-block for the integer dot products
(``native_q8``, layers/linear.py) and a bfloat16 KV cache, **when** held-out perplexity
(flashdecode/data/heldout.txt) with both stays within ``PPL_TOLERANCE`` of the exact path. The check
runs once per model, at its first load, and its result is recorded in the cache directory
(``models/<key>/numerics.json``, beside the softmax calibration); models measured before release ship
their records in flashdecode/data/numerics.json, keyed by the file's content. Float checkpoints, and
anything the check rejects, stay exact.

The engine hands the decision down: the plans of the quantized projections (``native`` becomes
``native_q8``) and the KV cache's storage.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..layers.attention import AttentionMetadata, PrefillSegment
from ..layers.dataflow import is_approx, static_candidate
from ..layers.kv_cache import KVCache
from ..layers.linear import Linear, iter_linears
from ..models.decoder import Decoder
from ..models.loader import resolve_model_path
from ..models.tokenizer import Tokenizer
from ..utils.paths import read_json, write_json
from .calibration import model_cache_dir
from .parallel.groups import ParallelGroup

PPL_TOLERANCE = 0.005  # int8 activations and a 16-bit KV cache may raise held-out perplexity by 0.5%
CHECK_TOKENS = 1024  # held-out tokens the check scores (heldout.txt holds fewer for most tokenizers)
RECORD_VERSION = 1
# bfloat16 rather than float16: on the embedded model float16 keys and values alone cost nothing, but
# beside int8 activations they doubled the perplexity increase (docs/numerics.md has the figures)
FAST_KV = "bf16"


@dataclass
class Numerics:
    int8_activations: bool
    kv_cache_dtype: str  # what the KV cache stores (config.py's KV_CACHE_DTYPES)
    record: dict[str, Any] | None = None  # the check's measurement, when one decided


def int8_candidates(model: Decoder) -> list[Linear]:
    """The projections that can run with int8 activations (quantized weights, a native_q8 build)."""
    return [lin for lin in iter_linears(model.linears()) if "native_q8" in lin.candidates(allow_approx=True)]


def use_int8_activations(model: Decoder) -> None:
    """Every ``native`` range of a quantized projection's plan runs with int8 activations instead: on
    the rows-interleaved repack where the format has one (``native_i8``), else on the stored planes
    (``native_q8``). Both round the activations alike, so one held-out check covers both."""
    for lin in int8_candidates(model):
        int8 = "native_i8" if "native_i8" in lin.candidates(allow_approx=True) else "native_q8"
        lin.set_plan([(m, int8 if name == "native" else name) for m, name in lin.plan])


def use_exact_kernels(model: Decoder) -> None:
    """Approximate kernels a tuned table may hold give way to the format's own kernel."""
    for lin in iter_linears(model.linears()):
        if any(is_approx(name) for _, name in lin.plan):
            lin.set_plan([(m, static_candidate(lin) if is_approx(name) else name) for m, name in lin.plan])


# --- the held-out check ------------------------------------------------------------------------------


def heldout_ids(tokenizer: Tokenizer, limit: int) -> list[int]:
    text = resources.files("flashdecode").joinpath("data/heldout.txt").read_text(encoding="utf-8")
    return tokenizer.encode(text)[:limit]


LOGIT_ROWS = 32  # the held-out check's logits per call


@torch.inference_mode()
def perplexity(model: Decoder, cache: KVCache, ids: list[int], chunk: int = 256) -> float:
    """Teacher-forced perplexity of ``ids`` as one sequence in slots 0..len-1 of ``cache``, prefilled
    in chunks (the engine's prefill path: causal attention over the cached prefix)."""
    nll, n = 0.0, len(ids)
    tokens = torch.tensor(ids)
    for start in range(0, n - 1, chunk):
        end = min(n - 1, start + chunk)
        meta = AttentionMetadata(slot_mapping=torch.arange(start, end))
        meta.prefills.append(
            PrefillSegment(start=0, num_query=end - start, context_len=end, slots=torch.arange(end))
        )
        hidden = model.forward(tokens[start:end], torch.arange(start, end), cache, meta)
        # the vocabulary-wide logits a few rows at a time: a chunk's at once would be the load's
        # largest temporary (rows are independent, so the sum is the same terms)
        targets = tokens[start + 1 : end + 1, None]
        for row in range(0, end - start, LOGIT_ROWS):
            logp = torch.log_softmax(model.logits(hidden[row : row + LOGIT_ROWS]), dim=-1)
            nll -= float(logp.gather(1, targets[row : row + LOGIT_ROWS]).sum())
    return math.exp(nll / (n - 1))


def measure(model: Decoder, tokenizer: Tokenizer, spec: Any, dtype: torch.dtype) -> dict[str, Any]:
    """Held-out perplexity exact and with int8 activations and a 16-bit KV cache."""
    ids = heldout_ids(tokenizer, min(CHECK_TOKENS, spec.max_position))
    linears = int8_candidates(model)
    plans = {id(lin): lin.plan for lin in linears}

    def cache(kv_dtype: str) -> KVCache:
        return KVCache(spec.num_layers, len(ids), spec.num_kv_heads, spec.head_dim, dtype, kv_dtype)

    start = time.perf_counter()
    exact = perplexity(model, cache("auto"), ids)
    use_int8_activations(model)
    fast = perplexity(model, cache(FAST_KV), ids)
    for lin in linears:
        lin.set_plan(plans[id(lin)])
    return {
        "format": "flashdecode-numerics",
        "version": RECORD_VERSION,
        "tokens": len(ids),
        "exact": exact,
        "int8_activations_16bit_kv": fast,
        "kv_cache_dtype": FAST_KV,
        "tolerance": PPL_TOLERANCE,
        "allowed": bool(fast <= exact * (1 + PPL_TOLERANCE)),
        "seconds": round(time.perf_counter() - start, 2),
    }


# --- records -------------------------------------------------------------------------------------------


def content_key(path: Path) -> str:
    """A GGUF file's identity by content (size, first and last MiB): what shipped records match."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:32]


def shipped_record(path: Path) -> dict[str, Any] | None:
    table = json.loads(
        resources.files("flashdecode").joinpath("data/numerics.json").read_text(encoding="utf-8")
    )
    record = table.get("models", {}).get(content_key(path)) if path.is_file() else None
    return record if record and record.get("version") == RECORD_VERSION else None


def record_for(model_arg: str | None, measure_now, group: ParallelGroup | None = None) -> dict[str, Any]:
    """The check's record for this model: shipped, cached, or measured now (and cached). Under tensor
    parallelism every rank takes rank 0's record, so that either all ranks measure (the check runs
    the model, whose collectives need every rank) or none; rank 0 caches it."""
    path = resolve_model_path(model_arg).resolve()
    cached = model_cache_dir(model_arg) / "numerics.json"
    record = shipped_record(path) or read_json(cached)
    if not (isinstance(record, dict) and record.get("version") == RECORD_VERSION and "allowed" in record):
        record = None
    if group is not None:
        record = group.from_rank0(record)
    if record is None:
        record = measure_now()
        if group is None or group.rank == 0:
            write_json(cached, record)
    return record


def resolve(
    mode: str,
    kv_cache_dtype: str,
    model_arg: str | None,
    model: Decoder,
    tokenizer: Tokenizer,
    quantized_file: bool,
    group: ParallelGroup | None = None,
) -> Numerics:
    """What ``mode`` means for this model; the plans of ``model`` are set to match. ``group``: the
    group of every rank, whose ranks decide alike."""
    if mode == "exact":
        use_exact_kernels(model)
        return Numerics(False, kv_cache_dtype)
    if not quantized_file or not int8_candidates(model):
        return Numerics(False, kv_cache_dtype)
    record = record_for(model_arg, lambda: measure(model, tokenizer, model.spec, model.dtype), group)
    if not record["allowed"]:
        return Numerics(False, kv_cache_dtype, record)
    use_int8_activations(model)
    fast_kv = record.get("kv_cache_dtype", FAST_KV)
    return Numerics(True, fast_kv if kv_cache_dtype == "auto" else kv_cache_dtype, record)
