"""Engine configuration: one dataclass, validated once, resolved against the loaded model."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from .errors import FlashDecodeError

# the choices of the engine's options, named once here for every layer that checks them
SOFTMAX_MODES = ("auto", "exact", "unified")  # FlashDecoding++ section 3 (layers/attention.py)
DATAFLOW_MODES = ("auto", "off")  # FlashDecoding++ section 5 (layers/dataflow.py)
KV_CACHE_DTYPES = ("auto", "f16", "bf16", "int8")
QUANTIZATIONS = (None, "int8", "int4")
NUMERICS_MODES = ("auto", "exact")  # engine/numerics.py
DEVICES = ("cpu", "cuda")  # "cuda": the Triton kernels (layers/device.py resolves it)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
DEFAULT_KV_CACHE_BYTES = 2 << 30
SPECULATIVE_METHODS = ("ngram", "draft")  # engine/spec_decode.py


@dataclass
class SpeculativeConfig:
    """Speculative decoding (engine/spec_decode.py), as vLLM's ``speculative_config``: each step a
    running sequence may draft up to ``num_speculative_tokens`` tokens, verified in the same step.

    ``ngram`` (prompt lookup): the drafts are the tokens that followed an earlier occurrence of the
    sequence's last n tokens in its prompt and output, for the largest n from ``prompt_lookup_max``
    down to ``prompt_lookup_min`` that occurs, the occurrence whose match runs furthest back, as many
    as pay at the sequence's acceptance rate for matches that long.

    ``draft``: a smaller ``model`` (GGUF file or Hugging Face folder) with the target's vocabulary
    drafts the tokens one at a time, sampled from its own distribution under the request's sampling
    parameters; it keeps its own KV cache in the target's blocks."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    model: str | None = None  # the draft model (method "draft" only)
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 1
    # the cost of one more query row in a decode step, as a fraction of a one-row step: what the
    # adaptive draft length weighs against the expected accepted tokens (engine/spec_decode.py) until
    # the engine has timed its own steps, where the tuned dataflow table has not timed the kernels.
    # Small where a step is bound by reading the weights once; the default is conservative for CPUs
    # whose int8 products are compute-bound (AVX2 without VNNI), so that middling acceptance does not
    # draft at a loss
    draft_row_cost: float = 0.4

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise FlashDecodeError(
                f"speculative method={self.method!r}: expected one of {SPECULATIVE_METHODS}"
            )
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise FlashDecodeError(f"speculative {name}={value!r} must be a positive integer")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise FlashDecodeError(
                f"speculative prompt_lookup_min={self.prompt_lookup_min} must be <= "
                f"prompt_lookup_max={self.prompt_lookup_max}"
            )
        if self.method == "draft" and not isinstance(self.model, str):
            raise FlashDecodeError(
                f"speculative method 'draft' needs the draft model's path as model, got {self.model!r}"
            )
        if self.method != "draft" and self.model is not None:
            raise FlashDecodeError(f"speculative model= is for method 'draft', not {self.method!r}")
        cost = self.draft_row_cost
        if not isinstance(cost, (int, float)) or isinstance(cost, bool) or not 0 <= cost <= 1:
            raise FlashDecodeError(f"speculative draft_row_cost={cost!r} must be a number in [0, 1]")

    @classmethod
    def of(cls, value: SpeculativeConfig | dict[str, Any]) -> SpeculativeConfig:
        """The config of ``LLM(speculative={...})``: a dict of these fields, or a config."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise FlashDecodeError(
                f"speculative must be a dict such as {{'method': 'ngram', 'num_speculative_tokens': 4}}, "
                f"got {value!r}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise FlashDecodeError(f"unknown speculative option(s) {unknown}; known: {sorted(known)}")
        return cls(**value)


@dataclass
class EngineConfig:
    model: str | None = None  # GGUF file or Hugging Face folder; None = the embedded SmolLM2-135M
    dtype: str = "auto"  # compute dtype; "auto": float32 unless the checkpoint is stored in bfloat16
    max_model_len: int | None = None  # prompt + generated tokens per sequence; None = the model's context
    kv_block_size: int = 16  # tokens per KV-cache block
    # KV-cache budget: bytes, or a fraction of the memory available at start-up; with neither, room for
    # max_num_seqs full-length sequences capped at 2 GiB and at a quarter of the available memory
    kv_cache_bytes: int | None = None
    kv_cache_memory_fraction: float | None = None
    # "auto" (the compute dtype), "f16", "bf16", or "int8" (per-token, per-head scales)
    kv_cache_dtype: str = "auto"
    max_num_seqs: int = 64  # sequences decoded together in one step
    max_num_batched_tokens: int = 1024  # tokens (prefill chunks + decodes) per step
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # None = this machine's physical cores
    seed: int = 0
    # attention softmax (FlashDecoding++ section 3): "exact", "unified" (unified max value), or "auto"
    # (unified when `flashdecode calibrate` has calibrated this model, else exact)
    softmax: str = "auto"
    # linear kernels per shape and M (FlashDecoding++ section 5): "auto" follows the table `flashdecode
    # tune` wrote for this machine (else a documented default plan); "off": one fixed kernel per format
    dataflow: str = "auto"
    quantization: str | None = None  # None, "int8" (Q8_0) or "int4" (Q4_1): float weights at load
    # "cpu": the native C kernels and torch; "cuda": the Triton kernels, on a CUDA device (or on host
    # memory under TRITON_INTERPRET=1, which is how the GPU path is tested without one)
    device: str = "cpu"
    # "exact": stored weights, fp32 activations, a KV cache in the compute dtype; "auto": for quantized
    # GGUF weights, int8 activations and a float16 KV cache where the held-out check allows
    # (engine/numerics.py), else exact
    numerics: str = "auto"
    # speculative decoding: None (off), or a SpeculativeConfig or its fields as a dict
    speculative: SpeculativeConfig | dict[str, Any] | None = None
    # ranks the model is split over (Megatron's tensor parallelism over gloo, engine/parallel/): spawned
    # on this machine, or launched by torchrun; each holds its shard of the weights and KV cache
    tensor_parallel_size: int = 1
    # contiguous stages of layers (pipeline parallelism, engine/parallel/pipeline.py), each of
    # tensor_parallel_size ranks: tensor_parallel_size * pipeline_parallel_size ranks in all
    pipeline_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.speculative is not None:
            self.speculative = SpeculativeConfig.of(self.speculative)
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise FlashDecodeError(f"dtype={self.dtype!r}: expected auto or one of {sorted(_DTYPES)}")
        positive = (
            "kv_block_size", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size",
            "pipeline_parallel_size",
        )  # fmt: skip
        for name in positive + ("max_model_len", "kv_cache_bytes", "num_threads"):
            value = getattr(self, name)
            if (value is not None or name in positive) and (not isinstance(value, int) or value < 1):
                raise FlashDecodeError(f"{name}={value!r} must be a positive integer")
        fraction = self.kv_cache_memory_fraction
        if fraction is not None and not (isinstance(fraction, (int, float)) and 0 < fraction <= 0.95):
            raise FlashDecodeError(f"kv_cache_memory_fraction={fraction!r} must be in (0, 0.95]")
        if fraction is not None and self.kv_cache_bytes is not None:
            raise FlashDecodeError("give kv_cache_bytes or kv_cache_memory_fraction, not both")
        if self.dataflow not in DATAFLOW_MODES:
            raise FlashDecodeError(f"dataflow={self.dataflow!r}: expected one of {DATAFLOW_MODES}")
        if self.quantization not in QUANTIZATIONS:
            raise FlashDecodeError(f"quantization={self.quantization!r}: expected None, int8 or int4")
        if self.softmax not in SOFTMAX_MODES:
            raise FlashDecodeError(f"softmax={self.softmax!r}: expected one of {SOFTMAX_MODES}")
        if self.numerics not in NUMERICS_MODES:
            raise FlashDecodeError(f"numerics={self.numerics!r}: expected one of {NUMERICS_MODES}")
        if self.device not in DEVICES:
            raise FlashDecodeError(f"device={self.device!r}: expected one of {DEVICES}")
        if self.world_size > 1 and self.device != "cpu":
            raise FlashDecodeError(
                "tensor_parallel_size or pipeline_parallel_size > 1 runs on device='cpu' (gloo) only for now"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise FlashDecodeError(
                f"kv_cache_dtype={self.kv_cache_dtype!r}: expected one of {KV_CACHE_DTYPES}"
            )

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def torch_dtype(self, stored_format: str) -> torch.dtype:
        """The compute dtype, given the storage format of the model's embedding matrix."""
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        # bf16 checkpoints stay bf16; everything else (fp32, fp16, GGUF blocks) computes in fp32,
        # because CPUs have no fast fp16 arithmetic and fp32 is exact for dequantized blocks.
        return torch.bfloat16 if stored_format in ("bfloat16", "BF16") else torch.float32
