"""Routed experts with per-expert LoRA, the plain-torch path (kernels/moe.py's reference loop with the adapters'
deltas inside): for each local expert e and the (token, e) pairs routed to it, gate_up = x W13_e^T + LoRA(gate_up)
and y = act(gate_up) W2_e^T + LoRA(down), each pair's adapter its token's. The LoRA deltas run through the kernels'
shrink / expand over the stacks of a piece (slot s, expert e at row s E + e), so a batch mixes adapters per pair.

Legend: T tokens, K experts per token, E local experts, D hidden, I expert intermediate, F = 2I, n an expert's pairs.

Why a path of its own, not the fused expert kernels: their grouped GEMMs take one weight per expert; the adapters'
deltas sit between the two GEMMs (before the activation), so a fused LoRA expert kernel is its own kernel (the GPU
plan: docs/lora.md). Used only for a step where a row's adapter targets this layer's experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from moelink.kernels.moe import SILU, MoEActivation, per_expert, sort_pairs

from .layer import LoRAPiece, LoRAStep


@dataclass
class ExpertsLoRA:
    """The hook of one MoE layer's experts (moe/layer.py `MoELayer.lora_experts`): per-expert A / B of gate_up_proj
    and down_proj, applied after dispatch inside the experts' computation (`lora_fused_moe`)."""

    step: LoRAStep
    kernels: Any
    num_experts: int
    gate_up: LoRAPiece
    down: LoRAPiece

    def active(self) -> bool:
        """Whether this step runs the layer's experts with LoRA (a row of an adapter that targets them)."""
        step = self.step
        return (step.slots_T is not None and step.experts and not step.captured
                and bool(self.gate_up.covered or self.down.covered))

    def token_slots(self) -> torch.Tensor | None:
        """The step's tokens' slots (long [T], -1: none; None: no row has an adapter)."""
        return self.step.slots_T

    def carries(self) -> bool:
        """Whether this step's dispatch carries each token's slot to the experts' ranks (EP)."""
        return self.step.carry

    def __call__(self, layer, x_TD: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor,
                 slots_T: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's local experts with the adapters of `slots_T` (the received rows' slots under EP; else the
        step's own tokens')."""
        slots_T = self.step.slots_T if slots_T is None else slots_T
        assert slots_T is not None  # active(), or the dispatch's slots
        return lora_fused_moe(self.kernels, x_TD, layer.w13_EFD, layer.w2_EDI, weights_TK, ids_TK, slots_T,
                              self.gate_up, self.down, self.num_experts, **layer._extras())


def lora_fused_moe(kernels: Any, x_TD: torch.Tensor, w13_EFD: torch.Tensor, w2_EDI: torch.Tensor,
                   weights_TK: torch.Tensor, ids_TK: torch.Tensor, slots_T: torch.Tensor, gate_up: LoRAPiece,
                   down: LoRAPiece, num_experts: int, *, b13_EF: torch.Tensor | None = None,
                   b2_ED: torch.Tensor | None = None, activation: MoEActivation = SILU) -> torch.Tensor:
    """out[t] = Σ_k w[t,k] · expert_{ids[t,k]}(x[t]) with each expert's gate_up_proj and down_proj carrying the
    adapter of slots[t] (none where -1); [T, D] in x's dtype. Ids -1 (padding) contribute nothing."""
    top_k = ids_TK.shape[1]
    out_TD = torch.zeros_like(x_TD)
    _, order_P, counts_E = sort_pairs(ids_TK, num_experts)
    weights_P = weights_TK.reshape(-1)
    for e, pairs_n, tok_n in per_expert(order_P, counts_E.tolist(), top_k):  # host sync: the counts drive the loop
        x_nD = x_TD.index_select(0, tok_n)
        slot_n = slots_T.index_select(0, tok_n)
        row_n = torch.where(slot_n >= 0, slot_n * num_experts + e, torch.full_like(slot_n, -1))  # its stack row
        h_nF = F.linear(x_nD, w13_EFD[e], None if b13_EF is None else b13_EF[e])
        if gate_up.covered:
            t_nR = kernels.lora_shrink(x_nD, gate_up.a_XRK, row_n)
            kernels.lora_expand(h_nF, t_nR, gate_up.b_XNR, row_n, gate_up.scale_X)
        gate_nI, up_nI = h_nF.chunk(2, dim=-1)
        a_nI = activation(gate_nI, up_nI)
        y_nD = F.linear(a_nI, w2_EDI[e], None if b2_ED is None else b2_ED[e])
        if down.covered:
            t_nR = kernels.lora_shrink(a_nI, down.a_XRK, row_n)
            kernels.lora_expand(y_nD, t_nR, down.b_XNR, row_n, down.scale_X)
        y_nD = y_nD * weights_P.index_select(0, pairs_n)[:, None].to(y_nD.dtype)
        out_TD.index_add_(0, tok_n, y_nD.to(out_TD.dtype))
    return out_TD
