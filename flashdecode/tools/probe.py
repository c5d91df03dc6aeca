"""Measured ceilings of this machine: memory read bandwidth and matmul throughput (the roofline's)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from ..kernels import cpu, reference
from ..utils.cpuinfo import physical_cores


@contextmanager
def _threads(num_threads: int | None) -> Iterator[int]:
    before = torch.get_num_threads()
    wanted = num_threads or physical_cores()
    torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        torch.set_num_threads(before)


def _best_time(fn: Callable[[], object], min_time: float, min_reps: int = 3) -> float:
    """The fastest of repeated calls (after one warm-up), running for at least ``min_time`` seconds."""
    fn()
    best = float("inf")
    start = time.perf_counter()
    reps = 0
    while reps < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return best


def measure_memory_bandwidth(
    num_threads: int | None = None, nbytes: int = 512 << 20, min_time: float = 0.5
) -> float:
    """Memory read bandwidth in bytes/s with ``num_threads`` threads (default: physical cores): the
    fastest full pass of a vectorised reduction over a buffer far larger than the caches. On some
    machines it is bimodal from process to process (page placement), so callers that report
    throughput should measure it in the same process."""
    with _threads(num_threads):
        x = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
        seconds = _best_time(x.sum, min_time)
    return x.numel() * 4 / seconds


MATMUL_DTYPES = ("fp32", "bf16", "int8")


def measure_matmul_flops(
    dtype: str, num_threads: int | None = None, sizes: tuple[int, ...] = (1024, 2048), min_time: float = 0.3
) -> float:
    """Dense square matmul throughput in FLOP/s (2 n^3 per product) for ``dtype`` in fp32, bf16 or
    int8 (the faster of ``torch._int_mm``, int8 x int8 -> int32, and flashdecode's own int8-activation
    kernel, which is what quantized weights run); the best over ``sizes``. 0.0 when
    neither torch nor the native build has a kernel for the dtype."""
    if dtype not in MATMUL_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {MATMUL_DTYPES}")
    best = _native_int8_flops(num_threads, sizes[0], min_time) if dtype == "int8" else 0.0
    with _threads(num_threads), torch.inference_mode():
        for n in sizes:
            if dtype == "int8":
                a = torch.randint(-8, 8, (n, n), dtype=torch.int8)
                b = torch.randint(-8, 8, (n, n), dtype=torch.int8)
                fn: Callable[[], object] = lambda a=a, b=b: torch._int_mm(a, b)
            else:
                torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
                a = torch.randn(n, n).to(torch_dtype)
                b = torch.randn(n, n).to(torch_dtype)
                fn = lambda a=a, b=b: torch.mm(a, b)
            try:
                seconds = _best_time(fn, min_time)
            except (RuntimeError, NotImplementedError):
                return best
            best = max(best, 2 * n**3 / seconds)
            if seconds > min_time:
                # larger sizes only keep fast units busy; one this slow (bf16 emulated where the CPU
                # has no bf16 instructions) is measured already, and a larger product costs minutes
                break
    return best


def _native_int8_flops(num_threads: int | None, n: int, min_time: float) -> float:
    """FLOP/s of the native int8-activation kernel (``native_i8``) on an n x n Q4_0 weight (its fastest
    format), M = n."""
    lib = cpu.load()
    if lib is None or not lib.has_i8:
        return 0.0
    with _threads(num_threads), torch.inference_mode():
        gen = torch.Generator().manual_seed(0)
        planes = reference.quantize(torch.randn(n, n, generator=gen), "Q4_0")
        packed, x = cpu.repack_i8("Q4_0", planes), torch.randn(n, n, generator=gen)
        seconds = _best_time(lambda: lib.linear_i8("Q4_0", x, packed, n), min_time)
    return 2 * n**3 / seconds
