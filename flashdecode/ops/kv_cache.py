"""The paged KV cache's storage: keys and values of every layer, one row per slot.

Block ``b`` of ``block_size`` tokens owns slots ``b * block_size`` to ``b * block_size + block_size - 1``;
which blocks a sequence owns is the block manager's business (engine/block_manager.py).
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer, one row per slot."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
        # torch.empty: pages the OS has not yet touched cost no RAM, so a generous budget is cheap
        self.k = torch.empty(num_layers, num_slots, num_kv_heads, head_dim, dtype=dtype)
        self.v = torch.empty(num_layers, num_slots, num_kv_heads, head_dim, dtype=dtype)

    @property
    def bytes_per_slot(self) -> int:
        return 2 * self.k.shape[0] * self.k.shape[2] * self.k.shape[3] * self.k.element_size()

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer].index_copy_(0, slot_mapping, k.to(self.k.dtype))
        self.v[layer].index_copy_(0, slot_mapping, v.to(self.v.dtype))

    def gather(
        self, layer: int, slots: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at ``slots`` (any shape), as ``dtype``: [*slots.shape, KVH, D] each."""
        return self.k[layer][slots].to(dtype), self.v[layer][slots].to(dtype)
