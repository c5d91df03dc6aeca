"""Asking the OS for transparent huge pages on a large buffer.

A decode step reads the KV cache's rows slot by slot, each layer's far from the last: with 4 KB
pages nearly every row is a TLB miss and a page walk, with 2 MB pages one walk serves 512 pages'
worth. Linux backs a region with huge pages on first touch where it was advised so
(``MADV_HUGEPAGE``) and transparent huge pages are in ``madvise`` or ``always`` mode; elsewhere this
does nothing.

A memory-mapped file's pages that a process has read count in its resident set until it unmaps the
file; ``drop_mapped_pages`` lets a loader that has copied a tensor out give its pages back at once
(the OS keeps them in its page cache), so the file is never resident beside its whole copy.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
from typing import Any

import numpy as np
import torch

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
MADV_DONTNEED = 4
PAGE = mmap.PAGESIZE


@functools.cache
def _libc_madvise() -> Any:
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def _madvise(start: int, length: int, advice: int) -> bool:
    return _libc_madvise()(ctypes.c_void_p(start), ctypes.c_size_t(length), advice) == 0


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Advise the whole 2 MB pages inside ``t``'s storage (a host tensor not yet written: pages
    already touched keep their size). Returns whether the OS took the advice."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu":
        return False
    start = t.untyped_storage().data_ptr()
    end = start + t.untyped_storage().nbytes()
    lo, hi = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
    if hi <= lo:
        return False
    return _madvise(lo, hi - lo, MADV_HUGEPAGE)


def drop_mapped_pages(mapping: np.ndarray, part: np.ndarray) -> bool:
    """Give back the resident pages of ``part``, a view into ``mapping``: a read-only memory map of a
    file, whose pages the next read faults in again from the page cache. On anonymous or
    copy-on-write memory the same advice would lose the data, hence the checks that ``mapping`` is a
    read-only view of an ``mmap`` and that ``part`` lies inside it. The pages around ``part``'s ends
    go too; they are the file's as well. Returns whether the OS took the advice."""
    if not sys.platform.startswith("linux") or mapping.flags.writeable or part.nbytes == 0:
        return False
    if not _maps_a_file(mapping):
        return False
    base, start = mapping.ctypes.data, part.ctypes.data
    end = start + part.nbytes
    if start < base or end > base + mapping.nbytes:
        return False
    lo = max(start // PAGE * PAGE, base // PAGE * PAGE)
    return _madvise(lo, end - lo, MADV_DONTNEED)


def _maps_a_file(a: np.ndarray) -> bool:
    """Whether ``a`` is a view (of views) of an ``mmap`` (numpy's memmap keeps its map as its base)."""
    base = a.base
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, mmap.mmap)


def huge_page_copy(t: torch.Tensor, min_bytes: int = 8 * HUGE_PAGE) -> torch.Tensor:
    """``t``, or where it is a large host tensor, a copy of it on memory advised as huge pages before
    the copy touches it (a weight that a step streams through: fewer TLB misses per byte)."""
    if t.device.type != "cpu" or t.untyped_storage().nbytes() < min_bytes or not t.is_contiguous():
        return t
    out = torch.empty_like(t)
    if not advise_huge_pages(out):
        return t
    return out.copy_(t)
