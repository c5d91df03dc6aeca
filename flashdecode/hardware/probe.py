"""Facts about this machine that the engine adapts to."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def physical_cores() -> int:
    """Physical cores this process may run on. Hyper-threads share a core's vector units, so a
    memory- and SIMD-bound workload gains nothing from them (and GEMM threads fighting over one
    core lose)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(base + "physical_package_id") as f, open(base + "core_id") as g:
                cores.add((f.read().strip(), g.read().strip()))
        except OSError:
            return max(1, len(allowed))
    return max(1, len(cores)) if cores else max(1, len(allowed))


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), else total RAM."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# --- measured ceilings (used by the roofline model) --------------------------------------------------


def cache_dir() -> Path:
    """Where measurements are cached: $FLASHDECODE_CACHE_DIR, else $XDG_CACHE_HOME/flashdecode, else
    ~/.cache/flashdecode."""
    explicit = os.environ.get("FLASHDECODE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "flashdecode"


@contextmanager
def _threads(num_threads: int | None) -> Iterator[int]:
    import torch

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
    import torch

    with _threads(num_threads):
        x = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
        seconds = _best_time(x.sum, min_time)
    return x.numel() * 4 / seconds


MATMUL_DTYPES = ("fp32", "bf16", "int8")


def measure_matmul_flops(
    dtype: str, num_threads: int | None = None, sizes: tuple[int, ...] = (1024, 2048), min_time: float = 0.3
) -> float:
    """Dense square matmul throughput in FLOP/s (2 n^3 per product) for ``dtype`` in fp32, bf16 or
    int8 (``torch._int_mm``: int8 x int8 -> int32); the best over ``sizes``. 0.0 when this torch build
    has no kernel for the dtype."""
    import torch

    if dtype not in MATMUL_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {MATMUL_DTYPES}")
    best = 0.0
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
                return 0.0
            best = max(best, 2 * n**3 / seconds)
    return best


def load_cached(name: str) -> dict | None:
    path = cache_dir() / name
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def store_cached(name: str, data: dict) -> Path:
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path
