"""utils/memory.py: huge-page advice never changes a tensor's values, and small tensors stay as they are."""

from __future__ import annotations

import torch

from flashdecode.utils.memory import HUGE_PAGE, advise_huge_pages, huge_page_copy


def test_huge_page_copy_keeps_the_values() -> None:
    t = torch.randint(0, 255, (20 * HUGE_PAGE,), dtype=torch.uint8)
    copy = huge_page_copy(t)
    assert torch.equal(copy, t) and copy.dtype == t.dtype and copy.shape == t.shape
    small = torch.ones(16)
    assert huge_page_copy(small) is small
    view = t[::2]
    assert huge_page_copy(view) is view  # a strided view is left as it is


def test_advice_on_a_buffer_smaller_than_a_huge_page_is_declined() -> None:
    assert advise_huge_pages(torch.empty(100)) is False
