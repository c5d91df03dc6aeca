"""The paged KV cache's storage: keys and values of every layer, one row per slot.

Block ``b`` of ``block_size`` tokens owns slots ``b * block_size`` to ``b * block_size + block_size - 1``;
which blocks a sequence owns is the block manager's business (engine/block_manager.py).

Storage formats (``kv_cache_dtype``): the model's compute dtype, float16 (llama.cpp's default: three
more mantissa bits than bfloat16, ample range for keys and values), bfloat16, or int8 with one fp32
scale per token and head (symmetric, absmax / 127), as AccLLM's low-bit KV cache: int8 halves the
bytes per cached token against bf16 and quarters them against fp32, and decode attention is a
stream over the whole cache, so its bytes are its time.
"""

from __future__ import annotations

import torch

from ..config import KV_CACHE_DTYPES
from ..utils.memory import advise_huge_pages


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        compute_dtype: torch.dtype,
        kv_cache_dtype: str = "auto",
        device: torch.device | str = "cpu",
    ):
        """``device``: where the storage lives (the engine's ``Device.torch``)."""
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}: expected one of {KV_CACHE_DTYPES}")
        self.quantized = kv_cache_dtype == "int8"
        storage = {"auto": compute_dtype, "f16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}[
            kv_cache_dtype
        ]
        # a slot's K and V side by side per head: one index_copy_ writes both and one index_select
        # gathers both, and K and V stay [.., KVH, D] views whose (sequence, head) pairs merge into
        # one stride (ops/attention.py, ``_pairs``)
        shape = (num_layers, num_slots, num_kv_heads, 2, head_dim)
        # torch.empty: pages the OS has not yet touched cost no RAM, so a generous budget is cheap
        self.kv = torch.empty(shape, dtype=storage, device=device)
        advise_huge_pages(self.kv)
        if self.quantized:
            self.kv_scale = torch.empty(shape[:4], dtype=torch.float32, device=device)
        self._scratch: list[torch.Tensor | None] = [None] * 2  # kv, kv_scale

    @property
    def k(self) -> torch.Tensor:
        """[num_layers, num_slots, num_kv_heads, head_dim] view of the keys."""
        return self.kv[..., 0, :]

    @property
    def v(self) -> torch.Tensor:
        return self.kv[..., 1, :]

    @property
    def bytes_per_slot(self) -> int:
        """Bytes one cached token takes, all layers, K and V (and their scales)."""
        tensors = [self.kv] + ([self.kv_scale] if self.quantized else [])
        return sum(t[:, 0].numel() * t.element_size() for t in tensors)

    @staticmethod
    def bytes_per_token(
        num_layers: int, num_kv_heads: int, head_dim: int, compute_dtype: torch.dtype, kv_cache_dtype: str
    ) -> int:
        if kv_cache_dtype == "int8":
            return 2 * num_layers * num_kv_heads * (head_dim + 4)  # int8 values + one fp32 scale
        itemsize = 2 if kv_cache_dtype in ("f16", "bf16") else compute_dtype.itemsize
        return 2 * num_layers * num_kv_heads * head_dim * itemsize

    @staticmethod
    def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        scale = x.abs().amax(dim=-1).clamp_min(1e-12) / 127.0
        q = torch.round(x / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
        return q, scale

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        kv = torch.stack((k, v), dim=2)
        if self.quantized:
            kv, scale = self._quantize(kv)
            self.kv_scale[layer].index_copy_(0, slot_mapping, scale)
        self.kv[layer].index_copy_(0, slot_mapping, kv.to(self.kv.dtype))

    def gather(
        self, layer: int, slots: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at ``slots`` (any shape), as ``dtype``: [*slots.shape, KVH, D] each.

        The result may be a view of a scratch buffer that the next ``gather`` overwrites: use it
        before gathering again. Reusing the buffer matters: a fresh multi-megabyte tensor per layer
        per step costs more in page faults than the copy itself at long contexts."""
        kv = self._select(self.kv[layer], slots, 0)
        if self.quantized:
            kv = kv.float() * self._select(self.kv_scale[layer], slots, 1)[..., None]
        k, v = kv.to(dtype).unbind(-2)
        return k, v

    def _select(self, source: torch.Tensor, slots: torch.Tensor, buffer: int) -> torch.Tensor:
        # each buffer serves one source, so it is kept in rows of the source's row shape
        n = slots.numel()
        scratch = self._scratch[buffer]
        if scratch is None or scratch.dtype != source.dtype or scratch.shape[0] < n:
            # grow geometrically so a context that lengthens by one token a step rarely reallocates
            scratch = self._scratch[buffer] = torch.empty(
                (n + n // 4, *source.shape[1:]), dtype=source.dtype, device=source.device
            )
        out = torch.index_select(source, 0, slots.reshape(-1), out=scratch[:n])
        return out.view(*slots.shape, *source.shape[1:])
