"""Tensor parallelism over ``torch.distributed`` (gloo): the process group and its collectives
(groups.py), the step metadata rank 0 broadcasts each step (step.py), the loop the other ranks run
(worker_loop.py), and how the ranks start: spawned by the engine or launched by torchrun (launch.py)."""
