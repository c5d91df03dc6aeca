"""The per-user cache directory and atomic JSON files in it; reports written where a user asks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import FlashDecodeError


def cache_dir() -> Path:
    """Where built kernels, measurements, tuned tables and calibrations live: $FLASHDECODE_CACHE_DIR,
    else $XDG_CACHE_HOME/flashdecode, else ~/.cache/flashdecode."""
    explicit = os.environ.get("FLASHDECODE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "flashdecode"


def read_json(path: Path) -> Any:
    """The parsed file, or None when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Any, indent: int = 1) -> Path:
    """Write ``data`` atomically: a concurrent reader sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=indent, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_report(path: str | Path, data: Any) -> None:
    """A tool's JSON report at the path a user gave (``--json``); one that cannot be written is a
    ``FlashDecodeError`` naming it, never a traceback."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
    except OSError as exc:
        raise FlashDecodeError(f"--json {path}: {exc.strerror or exc}") from None
