"""Numbers and tables as the command-line tools print them."""

from __future__ import annotations

import math
from typing import Any

from ..errors import FlashDecodeError


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g} B"


def fmt_rate(n: float) -> str:
    if not math.isfinite(n):
        return "inf"
    return f"{n:,.0f}" if n >= 100 else f"{n:.3g}"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain text table, numbers right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(x).rjust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def parse_int_list(text: str | list[int] | int, name: str) -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]``; anything but positive integers is a ``FlashDecodeError``."""
    if isinstance(text, int):
        items: list[Any] = [text]
    elif isinstance(text, list):
        items = text
    else:
        items = [t.strip() for t in str(text).split(",") if t.strip()]
    values = []
    for item in items:
        try:
            value = int(item)
        except (TypeError, ValueError):
            raise FlashDecodeError(f"{name}: {item!r} is not an integer (expected e.g. 1,8,32)") from None
        if value < 1:
            raise FlashDecodeError(f"{name}: {value} must be a positive integer")
        values.append(value)
    if not values:
        raise FlashDecodeError(f"{name}: give at least one value (e.g. 1,8,32)")
    return values
