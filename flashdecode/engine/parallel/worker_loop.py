"""What a parallel rank other than 0 runs: one step per broadcast, until the shutdown."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .groups import ParallelGroup
from .step import StepInputs, recv_step


def serve_steps(group: ParallelGroup, execute: Callable[[StepInputs], Any]) -> None:
    """Run ``execute`` (this rank's model on its shard) on every step rank 0 broadcasts, until it
    sends the shutdown."""
    while (step := recv_step(group)) is not None:
        execute(step)
