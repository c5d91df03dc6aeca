"""The one table of weight storage formats: what a format's blocks hold, how many bytes they take,
and how flashdecode runs it.

Block sizes of every GGUF type come from the ``gguf`` package (``GGML_QUANT_SIZES``); this table adds
what only flashdecode knows: which formats run natively, the planes a native format is split into
(``QuantizedTensor`` in layers/quant.py) and the format id the C kernels take. Names are GGUF's
(``Q4_1``, ``BF16``); torch dtype names of safetensors checkpoints (``bfloat16``, ``torch.float32``)
resolve to GGUF's float names.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import FlashDecodeError

BLOCK = 32  # elements per block of a native format's planes
QK_K = 256  # elements per K-quant super-block


@dataclass(frozen=True)
class NativeLayout:
    """How a native format is held: ``qs`` uint8 [N, K/32, qs_bytes], ``d`` [N, K/32 * scales_per_block]
    and, with ``has_min``, ``m`` shaped as ``d`` (a min per scale), both of ``scale_dtype``."""

    kernel_id: int  # the format id of fd_linear / fd_dequant (kernels/cpu/flat_gemm.c)
    qs_bytes: int
    scale_dtype: str  # "float16" (the file's scales, as stored) or "float32" (K-quants, multiplied out)
    has_min: bool = False
    scales_per_block: int = 1
    repacked: bool = False  # K-quants: super-blocks repacked at load (the file's bytes are not kept)
    int8_activations: bool = False  # fd_linear_i8 runs it (int8 activations x weights 16 rows a vector)


# GGUF name -> native layout; every other format is dequantized at load
NATIVE: dict[str, NativeLayout] = {
    "Q4_0": NativeLayout(0, 16, "float16", int8_activations=True),
    "Q4_1": NativeLayout(1, 16, "float16", has_min=True, int8_activations=True),
    "Q8_0": NativeLayout(2, 32, "float16", int8_activations=True),
    "Q4_K": NativeLayout(4, 16, "float32", has_min=True, repacked=True, int8_activations=True),
    "Q5_K": NativeLayout(5, 32, "float32", has_min=True, repacked=True, int8_activations=True),
    "Q6_K": NativeLayout(6, 32, "float32", scales_per_block=2, repacked=True, int8_activations=True),
    # a scale and a min per 16 (the file's sub-blocks), values 0..3 in Q4_K's nibbles
    "Q2_K": NativeLayout(
        7, 16, "float32", has_min=True, scales_per_block=2, repacked=True, int8_activations=True
    ),
}
BF16_KERNEL_ID = 3  # bf16 matrices run on the flat GEMM too, as [N, K] bf16 with no scales

# GGUF types with no kernel of their own whose values one native layout holds exactly: they are
# repacked into it at load (layers/quant.py) and run there, never inflated to float. Q5_0 and Q5_1
# become Q5_K's byte-per-value planes (w = d * q + m with d * q exact), IQ4_NL becomes Q8_0's (its
# 16-entry table values are int8), Q3_K and IQ4_XS become Q6_K's (int8 values, an fp32 scale per 16
# that is an fp16 times a small integer, exact).
REPACKED_INTO: dict[str, str] = {
    "Q5_0": "Q5_K",
    "Q5_1": "Q5_K",
    "IQ4_NL": "Q8_0",
    "Q3_K": "Q6_K",
    "IQ4_XS": "Q6_K",
}

NATIVE_FORMATS = tuple(NATIVE)
LOADED_NATIVE = NATIVE_FORMATS + tuple(REPACKED_INTO)  # every GGUF type that loads without inflating
BYTE_FORMATS = tuple(f for f, layout in NATIVE.items() if not layout.repacked)  # the file's bytes, split
REPACKED_FORMATS = tuple(f for f, layout in NATIVE.items() if layout.repacked)
I8_FORMATS = tuple(f for f, layout in NATIVE.items() if layout.int8_activations)

FLOAT_FORMATS = ("F64", "F32", "F16", "BF16")
_TORCH_NAMES = {
    "FLOAT64": "F64",
    "DOUBLE": "F64",
    "FLOAT32": "F32",
    "FLOAT": "F32",
    "FLOAT16": "F16",
    "HALF": "F16",
    "BFLOAT16": "BF16",
    "INT8": "I8",
    "UINT8": "I8",
}


def canonical(fmt: str) -> str:
    """GGUF's name of a format given by GGUF or torch name (``bfloat16``, ``torch.float32``...)."""
    key = str(fmt).upper().removeprefix("TORCH.")
    return _TORCH_NAMES.get(key, key)


def block_size(fmt: str) -> tuple[int, int]:
    """(elements, bytes) of one stored block of ``fmt``."""
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType[canonical(fmt)]]
    except KeyError:
        raise FlashDecodeError(f"unknown weight storage format {fmt!r}") from None


def bytes_per_weight(fmt: str) -> float:
    elements, nbytes = block_size(fmt)
    return nbytes / elements


def is_float(fmt: str) -> bool:
    return canonical(fmt) in FLOAT_FORMATS


def is_quantized(fmt: str) -> bool:
    """A block format (not a float or plain integer type)."""
    return block_size(fmt)[0] > 1
