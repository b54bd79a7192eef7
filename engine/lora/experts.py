"""Routed experts with per-expert LoRA: the hook a MoE layer runs in place of its expert kernels for a step whose
rows' adapters target its experts. The work is the kernel backend's `lora_fused_moe` (kernels/ops_lora.py), the one
strategy chosen with the backend: on a GPU (Triton) the sorted fused MoE with the deltas on its sorted rows
(kernels/triton_lora_moe.py: no host loop, no sync, so a decode CUDA graph captures it); on a CPU the plain-torch
loop over the local experts with the deltas inside (kernels/lora_moe.py). Either way, for expert e's (token, e)
pairs, gate_up = x W13_e^T + LoRA(gate_up), the activation, y = act W2_e^T + LoRA(down), each pair's adapter its
token's; an expert tensor's stacks hold slot s, expert e at row s E + e.

Legend: T tokens, K experts per token, E local experts, D hidden, I expert intermediate, F = 2I.

Why a path of its own, not the layer's expert kernels: the adapters' deltas sit inside the expert, between the two
GEMMs (before the activation), and each pair's adapter is its token's. Used only for a step where a row's adapter
targets this layer's experts, or (a backend whose path graphs capture) every forward a decode graph captures.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moelink.kernels.lora_moe import ExpertLoRA

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
        """Whether this forward runs the layer's experts with LoRA: a row of an adapter that targets them, or the
        forward a decode graph captures when the backend's path has no host loop (`in_graphs`)."""
        step = self.step
        if step.captured:
            return in_graphs(self.kernels)
        return step.slots_T is not None and step.experts and bool(self.gate_up.covered or self.down.covered)

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
                              self.gate_up, self.down, every=self.step.captured, **layer._extras())


def in_graphs(kernels: Any) -> bool:
    """Whether the backend's `lora_fused_moe` may be captured by a decode CUDA graph (kernels/ops_lora.py)."""
    return bool(getattr(kernels, "lora_experts_in_graphs", False))


def lora_fused_moe(kernels: Any, x_TD: torch.Tensor, w13_EFD: torch.Tensor, w2_EDI: torch.Tensor,
                   weights_TK: torch.Tensor, ids_TK: torch.Tensor, slots_T: torch.Tensor, gate_up: LoRAPiece,
                   down: LoRAPiece, *, every: bool = False, **extras: Any) -> torch.Tensor:
    """out[t] = Σ_k w[t,k] · expert_{ids[t,k]}(x[t]) with each expert's gate_up_proj and down_proj carrying the
    adapter of slots[t] (none where -1); [T, D] in x's dtype. A piece no slot's adapter covers adds nothing and is
    skipped, unless `every` (a captured forward: which slots cover it is known only at replay; it holds zeros)."""
    def of(p: LoRAPiece) -> ExpertLoRA | None:
        return ExpertLoRA(p.a_XRK, p.b_XNR, p.scale_X) if every or p.covered else None

    return kernels.lora_fused_moe(x_TD, w13_EFD, w2_EDI, weights_TK, ids_TK, slots_T, of(gate_up), of(down), **extras)
