"""Mixture-of-experts MLP: top-k softmax routing and the grouped expert loop.

A step's tokens, from every sequence, are routed together: each picks its top-k experts from the
softmax of the router's logits. The (token, expert) pairs are sorted by expert, and each expert that
was chosen runs once, as one matrix product over exactly the tokens that chose it (at decode, a flat
GEMM of a few rows: FlashDecoding++ section 4), weighted by its routing weight and scattered back with
``index_add_``. The loop is over experts, never over tokens; every expert's projections are ``Linear``s,
so each runs with whichever kernel its plan picks for its own M.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .linear import Linear, SplitLinear, iter_linears

Activation = Callable[[torch.Tensor], torch.Tensor]


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, expert ids), each [T, top_k]: the top-k of the softmax over the router's logits, in
    fp32 as transformers routes; ``renormalize``: divided by their sum over the chosen k."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class GatedMLP:
    """act(x G^T) * (x U^T), then D: one SwiGLU expert (gate and up fused into one projection)."""

    def __init__(self, gate_up: Linear | SplitLinear, down: Linear, act: Activation):
        self.gate_up = gate_up
        self.down = down
        self.act = act
        self.inter = down.in_features

    def projections(self) -> list[Linear | SplitLinear]:
        return [self.gate_up, self.down]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)
        return self.down(self.act(gate_up[:, : self.inter]) * gate_up[:, self.inter :])


class SparseMoE:
    """Routed experts, plus an optional shared expert every token runs, scaled by
    sigmoid(x . shared_expert_gate) (Qwen2-MoE)."""

    def __init__(
        self,
        router: Linear,
        experts: list[GatedMLP],
        top_k: int,
        renormalize: bool,
        shared: GatedMLP | None = None,
        shared_gate: torch.Tensor | None = None,
    ):
        self.router = router
        self.experts = experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.shared = shared
        self.shared_gate = shared_gate

    def projections(self) -> list[Linear | SplitLinear]:
        mods: list[Linear | SplitLinear] = [self.router]
        for expert in self.experts + ([self.shared] if self.shared is not None else []):
            mods += expert.projections()
        return mods

    def linears(self) -> list[Linear]:
        return list(iter_linears(self.projections()))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.router(x), self.top_k, self.renormalize)
        flat = ids.flatten()
        order = torch.argsort(flat, stable=True)  # the (token, choice) pairs grouped by expert
        tokens = order // self.top_k
        weights = weights.flatten()[order].to(x.dtype).unsqueeze(1)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        out = torch.zeros_like(x)
        start = 0
        for expert, count in zip(self.experts, counts):
            if count:
                rows = tokens[start : start + count]
                out.index_add_(0, rows, expert(x[rows]) * weights[start : start + count])
                start += count
        if self.shared is not None:
            out += torch.sigmoid(F.linear(x, self.shared_gate)) * self.shared(x)
        return out
