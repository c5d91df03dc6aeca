"""How the parallel ranks start: launched by torchrun, or spawned by the engine on one machine.

Under ``torchrun`` (its ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_WORLD_SIZE`` and ``MASTER_ADDR`` /
``MASTER_PORT`` in the environment) every process runs the same command; rank 0 goes on to be the
engine and the others become workers here, leaving the process once rank 0 shuts them down. Without
torchrun the engine starts ranks 1..T*P-1 itself (``torch.multiprocessing``: forked from a fork
server that has imported torch and the engine once, where the platform has one, else spawned) and
meets them on a free local port; either way each rank imports the main module again, as a spawned
process does.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable

import torch.multiprocessing as mp

from ...config import EngineConfig
from ...errors import DistributedError, FlashDecodeError
from ...models.loader import model_spec
from ...models.pipeline_parallel import check_stages
from ...models.tensor_parallel import check_divisible
from .groups import ParallelGroup
from .step import send_shutdown

# a rank's life after joining the group: build its shard of the model, then serve rank 0's steps
# (engine/worker.py's ``run_worker``; a module-level function, so spawned processes can unpickle it)
RunWorker = Callable[[EngineConfig, ParallelGroup], None]

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


def _spawned_worker(
    index: int, config: EngineConfig, init_method: str, run_worker: RunWorker, environ: dict[str, str]
) -> None:
    # the fork server's environment is the one it started with: a rank runs under rank 0's of now
    os.environ.clear()
    os.environ.update(environ)
    group = ParallelGroup(index + 1, config.world_size, init_method, tensor_size=config.tensor_parallel_size)
    try:
        run_worker(config, group)
    except FlashDecodeError:
        pass  # bad input fails alike on rank 0, which reports it
    finally:
        group.close()
    # a worker holds nothing to save, and the interpreter's teardown of torch takes seconds that
    # rank 0's shutdown would wait for
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _start_method() -> str:
    """A fork server where the platform has one: it imports torch and the engine once for every
    world this process starts, and forks each rank from that clean, single-threaded process (a
    spawned rank imports them again, seconds of each rank's start-up)."""
    if "forkserver" not in mp.get_all_start_methods():
        return "spawn"
    mp.set_forkserver_preload([__name__])
    return "forkserver"


class Ranks:
    """Rank 0's handle on the group and on the workers it spawned (None under torchrun)."""

    def __init__(self, group: ParallelGroup, workers: mp.ProcessContext | None = None):
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
    """Rank 0's group of ``config.world_size`` ranks, the others running ``run_worker``. In a
    torchrun worker (rank > 0) this runs ``run_worker`` and then leaves the process."""
    size, tensor_size = config.world_size, config.tensor_parallel_size
    spec = model_spec(config.model)  # sizes that do not fit fail before any rank starts
    check_divisible(spec, tensor_size)
    check_stages(spec, config.pipeline_parallel_size)
    launched = torchrun_rank()
    if launched is not None:
        rank, world, local = launched
        if world != size:
            raise FlashDecodeError(
                f"torchrun started {world} ranks for tensor_parallel_size * pipeline_parallel_size={size}"
            )
        group = ParallelGroup(rank, world, "env://", local, tensor_size=tensor_size)
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
        args=(config, init_method, run_worker, dict(os.environ)),
        nprocs=size - 1,
        join=False,
        start_method=_start_method(),
    )
    try:
        return Ranks(ParallelGroup(0, size, init_method, tensor_size=tensor_size), workers)
    except BaseException:
        for process in workers.processes:
            process.terminate()
        raise
