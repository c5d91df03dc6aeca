"""How the tensor-parallel ranks start: launched by torchrun, or spawned by the engine on one machine.

Under ``torchrun`` (its ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_WORLD_SIZE`` and ``MASTER_ADDR`` /
``MASTER_PORT`` in the environment) every process runs the same command; rank 0 goes on to be the
engine and the others become workers here, leaving the process once rank 0 shuts them down. Without
torchrun the engine spawns ranks 1..T-1 itself (``torch.multiprocessing``, spawn) and meets them on
a free local port.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch.multiprocessing as mp

from ...config import EngineConfig
from ...errors import DistributedError, FlashDecodeError
from ...models.loader import model_spec
from ...models.tensor_parallel import check_divisible
from .groups import TPGroup
from .step import send_shutdown

# a rank's life after joining the group: build its shard of the model, then serve rank 0's steps
# (engine/worker.py's ``run_worker``; a module-level function, so spawned processes can unpickle it)
RunWorker = Callable[[EngineConfig, TPGroup], None]

SHUTDOWN_JOIN_S = 30.0  # how long a shut-down worker may take to leave before it is terminated


def torchrun_rank() -> tuple[int, int, int] | None:
    """(rank, world size, ranks on this machine) when torchrun launched this process, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_WORLD_SIZE", world))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned_worker(index: int, config: EngineConfig, init_method: str, run_worker: RunWorker) -> None:
    group = TPGroup(index + 1, config.tensor_parallel_size, init_method)
    try:
        run_worker(config, group)
    except FlashDecodeError:
        pass  # bad input fails alike on rank 0, which reports it
    finally:
        group.close()


class Ranks:
    """Rank 0's handle on the group and on the workers it spawned (None under torchrun)."""

    def __init__(self, group: TPGroup, workers: mp.ProcessContext | None = None):
        self.group, self.workers = group, workers

    def shutdown(self) -> None:
        """End the workers' loop, leave the group, and wait for spawned workers to exit."""
        try:
            send_shutdown(self.group)
        except DistributedError:
            pass  # a worker is already gone: nothing is left to tell
        self.group.close()
        if self.workers is None:
            return
        for process in self.workers.processes:
            process.join(SHUTDOWN_JOIN_S)
            if process.is_alive():
                process.terminate()


def start(config: EngineConfig, run_worker: RunWorker) -> Ranks:
    """Rank 0's group of ``config.tensor_parallel_size`` ranks, the others running ``run_worker``. In
    a torchrun worker (rank > 0) this runs ``run_worker`` and then leaves the process."""
    size = config.tensor_parallel_size
    check_divisible(model_spec(config.model), size)  # before any rank starts
    launched = torchrun_rank()
    if launched is not None:
        rank, world, local = launched
        if world != size:
            raise FlashDecodeError(f"torchrun started {world} ranks for tensor_parallel_size={size}")
        group = TPGroup(rank, world, "env://", local)
        if rank == 0:
            return Ranks(group)
        try:
            run_worker(config, group)
        finally:
            group.close()
        raise SystemExit(0)
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    workers = mp.start_processes(
        _spawned_worker,
        args=(config, init_method, run_worker),
        nprocs=size - 1,
        join=False,
        start_method="spawn",
    )
    try:
        return Ranks(TPGroup(0, size, init_method), workers)
    except BaseException:
        for process in workers.processes:
            process.terminate()
        raise
