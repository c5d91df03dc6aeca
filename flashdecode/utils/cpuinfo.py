"""Facts about this CPU that the engine adapts to, read from /proc and /sys (never assumed)."""

from __future__ import annotations

import ctypes
import os
import resource
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


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    return set((_cpuinfo_field("flags") or "").split())


def cpu_model() -> str:
    return _cpuinfo_field("model name") or "unknown"


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


def reset_peak_rss() -> bool:
    """Start this process's peak resident set size afresh at its current size (Linux: writing 5 to
    /proc/self/clear_refs); False where that cannot be done (``peak_rss_bytes`` then counts from the
    process's start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim): loading a model frees large
    temporaries that the allocator would otherwise keep resident for the process's life. Nothing to
    do without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_bytes(key: str) -> int | None:
    """A size line of /proc/self/status (``VmRSS``, ``VmHWM``...) in bytes; None without it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """The peak resident set size of this process (since ``reset_peak_rss``): VmHWM, else getrusage."""
    peak = _status_bytes("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if peak is None else peak


def rss_bytes() -> int | None:
    """This process's resident set size now (VmRSS); None where /proc does not tell."""
    return _status_bytes("VmRSS")


def last_level_cache_bytes() -> int:
    """The largest CPU cache (sysfs), 32 MiB when unknown."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    return best or 32 << 20
