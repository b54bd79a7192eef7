"""The hooks LoRA targets run (set only with enable_lora): a linear's after its own matmul (engine/models/linear.py
`Linear.lora`): for each targeted piece, y[:, rows] += scale[slot] · (x A[slot]^T) B[slot]^T per row; an MoE layer's
in place of its experts (moe/layer.py `MoELayer.lora_experts`: `ExpertsLoRA`, engine/lora/experts.py). Both through
the kernels' LoRA family (kernels/ops_lora.py: Triton on a GPU, the plain-torch references on a CPU).

Legend: T tokens, K in features, N a piece's out features, R max_lora_rank, L slots, E experts; X the rows of a
piece's stacks: L for a linear, L · E for an expert tensor (slot s, expert e at s E + e).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LoRAStep:
    """What the coming forward's LoRA work reads: each token's slot (long [T], -1: no adapter; None: no row of the
    step has one, and the hooks do nothing). `carry`: under EP, the step's dispatch carries each token's slot to the
    experts' ranks (a slot of the agreed table targets routed experts: the same on every rank, so every rank's
    dispatch rows are as wide). `experts`: a row's adapter targets routed experts (one rank: the layers whose experts
    it targets run them on the experts' LoRA path; a step without one runs the layer's own expert kernels).
    `captured`: the forward a decode graph captures (engine/rank/cuda_graph.py): `slots_T` is the graph's static
    slot buffer, written before each replay, and every piece runs, covered or not, since which slots cover a piece
    is known only when the graph replays (a piece no slot's adapter targets holds zeros: its delta adds 0); the
    experts' LoRA path is captured (every layer's, both tensors) only on a backend whose path has no host loop
    (Triton, engine/lora/experts.py `in_graphs`); with the plain-torch loop a step whose rows' adapters target
    experts runs eagerly."""

    slots_T: torch.Tensor | None = None
    carry: bool = False
    experts: bool = False
    captured: bool = False


@dataclass
class LoRAPiece:
    """One target inside a linear's output (its `rows`), or one expert tensor (rows None): the slots' A [X, R, K],
    B [X, N, R] and scales [X]; `covered`: the slots whose adapter targets it (none: no LoRA work)."""

    rows: slice | None
    a_XRK: torch.Tensor
    b_XNR: torch.Tensor
    scale_X: torch.Tensor
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
        every = self.step.captured
        for p in self.pieces:
            if every or p.covered:
                t_TR = self.kernels.lora_shrink(x_TK, p.a_XRK, slots_T)
                self.kernels.lora_expand(y2[:, p.rows], t_TR, p.b_XNR, slots_T, p.scale_X)
        return y_TN
