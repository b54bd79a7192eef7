"""The hook a LoRA target linear runs after its own matmul (engine/models/linear.py `Linear.lora`): for each of its
targeted pieces, y[:, rows] += scale[slot] · (x A[slot]^T) B[slot]^T per row, through the kernels' LoRA family
(kernels/ops_lora.py: Triton on a GPU, the plain-torch references on a CPU).

Legend: T tokens, K in features, N a piece's out features, R max_lora_rank, L slots.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LoRAStep:
    """What the coming forward's LoRA work reads: each token's slot (long [T], -1: no adapter; None: no row of
    the step has one, and the hooks do nothing) and each slot's scale (float32 [L])."""

    scale_L: torch.Tensor
    slots_T: torch.Tensor | None = None


@dataclass
class LoRAPiece:
    """One target module inside a linear's output: its rows there, the slots' A [L, R, K] and B [L, N, R];
    `covered`: the slots whose adapter targets it (none: the piece runs no LoRA work)."""

    rows: slice
    a_LRK: torch.Tensor
    b_LNR: torch.Tensor
    covered: set[int] = field(default_factory=set)


@dataclass
class LinearLoRA:
    """The hook of one linear (a stacked one holds a piece per target module: q, k, v of qkv_proj)."""

    step: LoRAStep
    kernels: Any
    pieces: list[LoRAPiece] = field(default_factory=list)

    def __call__(self, x_TK: torch.Tensor, y_TN: torch.Tensor) -> torch.Tensor:
        slots_T = self.step.slots_T
        if slots_T is None:
            return y_TN
        x_TK = x_TK.reshape(-1, x_TK.shape[-1])
        y2 = y_TN.view(-1, y_TN.shape[-1])
        for p in self.pieces:
            if p.covered:
                t_TR = self.kernels.lora_shrink(x_TK, p.a_LRK, slots_T)
                self.kernels.lora_expand(y2[:, p.rows], t_TR, p.b_LNR, slots_T, self.step.scale_L)
        return y_TN
