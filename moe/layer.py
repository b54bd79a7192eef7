"""The MoE layer: router → experts → weighted sum, over the experts this rank holds.

Legend: T tokens, D hidden, E local experts, G global experts, I expert
intermediate size, F = 2I, K top-k.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .router import SoftmaxTopKRouter


class MoELayer(nn.Module):
    """A sparse MLP block. Expert weights are stacked: w13_EFD = [gate; up], w2_EDI = down.

    `kernels` is the device's kernel strategy (moelink.kernels.ops); the layer
    never asks which one it got.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, router: SoftmaxTopKRouter,
                 kernels, dtype: torch.dtype, device: torch.device | None = None):
        super().__init__()
        self.num_experts = num_experts
        self.router = router
        self.kernels = kernels
        factory = dict(dtype=dtype, device=device)
        self.gate_GD = nn.Parameter(torch.empty(num_experts, hidden_size, **factory), requires_grad=False)
        self.w13_EFD = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **factory), requires_grad=False)
        self.w2_EDI = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **factory), requires_grad=False)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        logits_TG = F.linear(x_TD, self.gate_GD)
        weights_TK, ids_TK = self.router(logits_TG)
        return self.kernels.fused_moe(x_TD, self.w13_EFD, self.w2_EDI, weights_TK, ids_TK)
