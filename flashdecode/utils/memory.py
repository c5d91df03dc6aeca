"""Asking the OS for transparent huge pages on a large buffer.

A decode step reads the KV cache's rows slot by slot, each layer's far from the last: with 4 KB
pages nearly every row is a TLB miss and a page walk, with 2 MB pages one walk serves 512 pages'
worth. Linux backs a region with huge pages on first touch where it was advised so
(``MADV_HUGEPAGE``) and transparent huge pages are in ``madvise`` or ``always`` mode; elsewhere this
does nothing.
"""

from __future__ import annotations

import ctypes
import sys

import torch

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14


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
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_HUGEPAGE) == 0


def huge_page_copy(t: torch.Tensor, min_bytes: int = 8 * HUGE_PAGE) -> torch.Tensor:
    """``t``, or where it is a large host tensor, a copy of it on memory advised as huge pages before
    the copy touches it (a weight that a step streams through: fewer TLB misses per byte)."""
    if t.device.type != "cpu" or t.untyped_storage().nbytes() < min_bytes or not t.is_contiguous():
        return t
    out = torch.empty_like(t)
    if not advise_huge_pages(out):
        return t
    return out.copy_(t)
