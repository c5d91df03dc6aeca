"""The process group of every rank: gloo over TCP, and the collectives the decoder and the engine run.

World rank r is tensor rank ``r % T`` of pipeline stage ``r // T``: the T ranks of a stage split its
layers' weights (their ``TensorGroup``, the decoder's ``Communicator``), and rank r sends its stage's
output to rank r + T of the next stage (the hidden states are replicated over a tensor group).

Every collective has the group's timeout, so a rank that dies or hangs turns into a
``DistributedError`` on the others instead of a wait without end (gloo also fails a collective at
once when a peer's connection closes). The one exception is the workers' wait for the next step
(``broadcast(..., idle=True)``), which runs on a second group without a practical timeout: a server
may sit idle for hours, and a rank 0 that dies closes its connections, which ends the wait at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
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
        raise DistributedError(f"parallel {what} failed (a rank died or stopped answering): {exc}") from exc


class CollectiveClock:
    """With ``on`` set (off by default: a clock read per call), the wall time of every collective, the
    wait for the slowest rank included, summed in ``seconds`` (benchmarks/distributed.py's
    communication share)."""

    def __init__(self) -> None:
        self.on, self.seconds = False, 0.0

    def run(self, what: str, fn: Callable[[], T]) -> T:
        if not self.on:
            return _guarded(what, fn)
        start = time.perf_counter()
        try:
            return _guarded(what, fn)
        finally:
            self.seconds += time.perf_counter() - start


@dataclass
class Transfer:
    """A point-to-point message in flight: its tensor (held until the message is done) and its work."""

    tensor: torch.Tensor
    work: dist.Work
    what: str


class TensorGroup:
    """The ranks of one pipeline stage, which split its weights (the ``Communicator`` of
    layers/parallel.py): ``rank`` and ``world_size`` within the stage."""

    def __init__(self, rank: int, world_size: int, group: dist.ProcessGroup, clock: CollectiveClock):
        self.rank, self.world_size, self.group, self.clock = rank, world_size, group, clock

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        self.clock.run("all-reduce", lambda: dist.all_reduce(x, group=self.group))
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        self.clock.run("all-gather", lambda: dist.all_gather(parts, x, group=self.group))
        return torch.cat(parts, dim=-1)


class ParallelGroup:
    """One rank's membership of the group of every rank: ``tensor_size`` ranks per pipeline stage,
    ``world_size / tensor_size`` stages.

    ``local_size``: the ranks on this machine, which share its cores; ``clock`` times the collectives
    of this rank."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        init_method: str,
        local_size: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        tensor_size: int | None = None,
    ):
        if dist.is_initialized():
            raise DistributedError("a torch.distributed process group already exists in this process")
        self.rank, self.world_size = rank, world_size
        self.local_size = world_size if local_size is None else local_size
        self.tensor_size = world_size if tensor_size is None else tensor_size
        self.pipeline_size = world_size // self.tensor_size
        self.stage, tensor_rank = divmod(rank, self.tensor_size)
        self.clock = CollectiveClock()
        _guarded(
            "start-up",
            lambda: dist.init_process_group(
                "gloo", init_method=init_method, rank=rank, world_size=world_size,
                timeout=timedelta(seconds=timeout_s),
            ),
        )  # fmt: skip
        self.idle_group = _guarded("start-up", lambda: dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT))
        # every rank creates every stage's group, in the same order (torch.distributed's rule)
        t = self.tensor_size
        stages = [
            _guarded("start-up", lambda s=s: dist.new_group(list(range(s * t, (s + 1) * t)), backend="gloo"))
            for s in range(self.pipeline_size)
        ]
        self.tensor = TensorGroup(tensor_rank, t, stages[self.stage], self.clock)

    def isend(self, x: torch.Tensor, dst: int, tag: int) -> Transfer:
        """``x`` on its way to rank ``dst`` (a pipeline stage's output to the next stage, or the logits
        to rank 0); ``wait`` for it before ``x`` changes."""
        x = x.contiguous()
        return Transfer(x, _guarded("send", lambda: dist.isend(x, dst, tag=tag)), "send")

    def irecv(self, x: torch.Tensor, src: int, tag: int) -> Transfer:
        """Rank ``src``'s ``isend`` of the same ``tag`` on its way into ``x``."""
        return Transfer(x, _guarded("receive", lambda: dist.irecv(x, src, tag=tag)), "receive")

    def wait(self, transfer: Transfer) -> torch.Tensor:
        """``transfer``'s tensor, once it has been sent or received."""
        self.clock.run(transfer.what, transfer.work.wait)
        return transfer.tensor

    def broadcast(self, x: torch.Tensor, idle: bool = False) -> torch.Tensor:
        """Rank 0's ``x`` into every rank's ``x`` (in place); ``idle``: on the group without a practical
        timeout (the workers' wait for the next step)."""
        group = self.idle_group if idle else None
        self.clock.run("broadcast", lambda: dist.broadcast(x, src=0, group=group))
        return x

    def min_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        self.clock.run("all-reduce", lambda: dist.all_reduce(t, op=dist.ReduceOp.MIN))
        return int(t[0])

    def from_rank0(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (set-up only: pickled)."""
        box = [value]
        _guarded("set-up broadcast", lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
