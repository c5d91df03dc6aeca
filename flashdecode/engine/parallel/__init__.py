"""Tensor and pipeline parallelism over ``torch.distributed`` (gloo): the process group, each stage's
tensor group and their collectives (groups.py), the step metadata rank 0 broadcasts each step
(step.py), a pipeline stage's part of a step (pipeline.py), the loop the other ranks run
(worker_loop.py), and how the ranks start: spawned by the engine or launched by torchrun (launch.py)."""
