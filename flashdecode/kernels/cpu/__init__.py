"""The CPU flat GEMM and dequantizer (flat_gemm.c, plain C ABI over data pointers) and its build."""

from .build import (
    ISA_BUILDS,
    NativeKernels,
    i8_format,
    kernel_dir,
    load,
    repack_i8,
    supported_builds,
    unpack_i8,
)

__all__ = [
    "ISA_BUILDS",
    "NativeKernels",
    "i8_format",
    "kernel_dir",
    "load",
    "repack_i8",
    "supported_builds",
    "unpack_i8",
]
