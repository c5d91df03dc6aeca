"""The tensor-parallel process group: gloo over TCP, and the collectives the decoder and the engine run.

Every collective has the group's timeout, so a rank that dies or hangs turns into a
``DistributedError`` on the others instead of a wait without end (gloo also fails a collective at
once when a peer's connection closes). The one exception is the workers' wait for the next step
(``broadcast(..., idle=True)``), which runs on a second group without a practical timeout: a server
may sit idle for hours, and a rank 0 that dies closes its connections, which ends the wait at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ...errors import DistributedError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 120.0  # a collective that waits longer means a rank is gone (model loading included)
IDLE_TIMEOUT = timedelta(days=3650)  # the workers' wait for the next step: as long as the server runs


def _guarded(what: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except (RuntimeError, ValueError) as exc:  # gloo's DistBackendError is a RuntimeError
        raise DistributedError(
            f"tensor parallel {what} failed (a rank died or stopped answering): {exc}"
        ) from exc


class TPGroup:
    """One rank's membership of the tensor-parallel group (the ``Communicator`` of layers/parallel.py).

    ``local_size``: the ranks on this machine, which share its cores. With ``timed`` set (off by
    default: a clock read per collective), every collective adds its wall time, the wait for the
    slowest rank included, to ``collective_s`` (benchmarks/distributed.py's communication share)."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        init_method: str,
        local_size: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ):
        if dist.is_initialized():
            raise DistributedError("a torch.distributed process group already exists in this process")
        self.rank, self.world_size = rank, world_size
        self.local_size = world_size if local_size is None else local_size
        self.timed, self.collective_s = False, 0.0
        _guarded(
            "start-up",
            lambda: dist.init_process_group(
                "gloo", init_method=init_method, rank=rank, world_size=world_size,
                timeout=timedelta(seconds=timeout_s),
            ),
        )  # fmt: skip
        self.idle_group = _guarded("start-up", lambda: dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT))

    def _run(self, what: str, fn: Callable[[], T]) -> T:
        if not self.timed:
            return _guarded(what, fn)
        start = time.perf_counter()
        try:
            return _guarded(what, fn)
        finally:
            self.collective_s += time.perf_counter() - start

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        self._run("all-reduce", lambda: dist.all_reduce(x))
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        self._run("all-gather", lambda: dist.all_gather(parts, x))
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor, idle: bool = False) -> torch.Tensor:
        """Rank 0's ``x`` into every rank's ``x`` (in place); ``idle``: on the group without a practical
        timeout (the workers' wait for the next step)."""
        group = self.idle_group if idle else None
        self._run("broadcast", lambda: dist.broadcast(x, src=0, group=group))
        return x

    def min_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        self._run("all-reduce", lambda: dist.all_reduce(t, op=dist.ReduceOp.MIN))
        return int(t[0])

    def from_rank0(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (set-up only: pickled)."""
        box = [value]
        _guarded("set-up broadcast", lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
