"""GPU kernels written in Triton, an optional dependency (``pip install flashdecode[gpu]``).

Importing this package imports nothing heavy: each kernel family lives in its own submodule
(``attention``: FlashDecoding++ section 3's unified-max split-KV decode and prefill), imported only
where it is used. On a CPU the kernels run under ``TRITON_INTERPRET=1`` (the tests do), which must
be set before triton is first imported.
"""

from __future__ import annotations

import importlib.util


def available() -> bool:
    """Whether triton can be imported."""
    return importlib.util.find_spec("triton") is not None
