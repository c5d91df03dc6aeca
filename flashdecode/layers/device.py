"""Where the model runs: the torch device its tensors live on and the kernel backend that runs them.

``resolve_device`` turns ``EngineConfig.device`` into a ``Device`` once, at engine construction; the
engine hands it down to the decoder (weights, RoPE tables, every ``Linear``), the KV cache and the
model runner. Nothing below the engine asks for a device on its own.

    "cpu"   torch device cpu, backend "native": the C flat GEMM (kernels/cpu/) and torch
    "cuda"  backend "triton" (kernels/triton/): on torch device cuda when ``torch.cuda.is_available()``;
            else, with ``TRITON_INTERPRET=1`` set (before triton is first imported) and triton
            installed, on host memory under Triton's interpreter: slow, but the GPU code path
            end to end, which is how it is tested on machines without a GPU
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..config import DEVICES
from ..errors import FlashDecodeError
from ..kernels import triton as triton_kernels
from ..utils.cpuinfo import available_memory_bytes

BACKENDS = ("native", "triton")


@dataclass(frozen=True)
class Device:
    name: str  # what was asked for: "cpu" or "cuda"
    torch: torch.device  # where tensors live
    backend: str  # which kernels run them: "native" (C and torch) or "triton"

    @property
    def on_host(self) -> bool:
        """Tensors live in host memory: moving the host-built inputs there is a no-op."""
        return self.torch.type == "cpu"

    def available_memory(self) -> int:
        """Free bytes where the tensors live (for the KV-cache budget)."""
        if self.torch.type == "cuda":
            return int(torch.cuda.mem_get_info(self.torch)[0])
        return available_memory_bytes()


CPU = Device("cpu", torch.device("cpu"), "native")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_device(name: str) -> Device:
    """``EngineConfig.device`` as a ``Device``; a ``FlashDecodeError`` when it cannot run here."""
    if name not in DEVICES:
        raise FlashDecodeError(f"device={name!r}: expected one of {DEVICES}")
    if name == "cpu":
        return CPU
    if not triton_kernels.available():
        raise FlashDecodeError(
            "device='cuda' runs the Triton kernels, but triton is not installed "
            "(pip install flashdecode[gpu])"
        )
    if torch.cuda.is_available():
        return Device("cuda", torch.device("cuda"), "triton")
    if triton_interpreted():
        return Device("cuda", torch.device("cpu"), "triton")
    raise FlashDecodeError(
        "device='cuda' but no CUDA device is available (torch.cuda.is_available() is False); use "
        "device='cpu', or set TRITON_INTERPRET=1 to run the Triton kernels on the CPU under the "
        "interpreter (slow: for testing)"
    )
