"""Gated hyper-connections (engine/models/hyper_connections_config.py, mixing "gated"; transformers'
Qwen4ExpTextGatedResidual): over hc_count residual streams x [T, n, D],
    normed = RMSNorm per stream (one weight of n * D)
    w = sigmoid(up(silu(down(normed) / n)))         [T, n * D]: a weight per stream and channel
    block input = mean over the streams of w * normed
    gates = 2 sigmoid(inject(normed) / n)            [T, n]
and after the block, stream k += gates[k] * out: DeepSeek-V4's residual step (kernels/hyper_connection.py's
hc_expand) with the identity as the stream mixing. The model's last mixer (no `inject`) only collapses.

Legend: T tokens, n streams, D hidden, r hc_lowrank.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moelink.kernels.hyper_connection import reference_hc_expand
from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ..hyper_connections_config import HyperConnectionConfig
from ..layers import RMSNorm, param

if TYPE_CHECKING:
    from moelink.kernels.ops import Kernels


class GroupedRMSNorm(RMSNorm):
    """RMSNorm of each `group`-wide slice of the last dim (transformers' Qwen4ExpTextRMSNorm with group_size), in
    float32 as the norm kernel; a zero-centred weight becomes a plain one at load as every RMSNorm's does."""

    def __init__(self, size: int, group: int, eps: float, kernels: Kernels, dtype, device=None):
        super().__init__(size, eps, kernels, dtype, device)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float().unflatten(-1, (-1, self.group))
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2).to(x.dtype)
        return self.weight * normed


class GatedHyperConnection(nn.Module):
    """One block's gated hyper-connection (module docstring); `inject` False: the model's final mixer."""

    def __init__(self, cfg: HyperConnectionConfig, hidden: int, eps: float, kernels: Kernels, dtype, device=None,
                 inject: bool = True):
        super().__init__()
        n, D, r = cfg.hc_mult, hidden, cfg.lowrank
        self.n, self.D = n, D
        self.hc_norm = GroupedRMSNorm(n * D, D, eps, kernels, dtype, device)
        self.down_rX = param(r, n * D, dtype=dtype, device=device)
        self.up_Xr = param(n * D, r, dtype=dtype, device=device)
        self.inject_nX = param(n, n * D, dtype=dtype, device=device) if inject else None
        self.expand_op = kernels.hc_expand if kernels is not None else reference_hc_expand

    def collapse(self, x_TnD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the block input [T, D], the per-stream gates [T, n], or None for the final mixer)."""
        T = x_TnD.shape[0]
        normed_TX = self.hc_norm(x_TnD.reshape(T, -1))
        w_TX = torch.sigmoid(F.linear(F.silu(F.linear(normed_TX, self.down_rX) / self.n), self.up_Xr))
        h_TD = (w_TX * normed_TX).view(T, self.n, self.D).mean(dim=1)
        if self.inject_nX is None:
            return h_TD, None
        return h_TD, 2 * torch.sigmoid(F.linear(normed_TX, self.inject_nX) / self.n)

    def residual(self, x_TnD: torch.Tensor, out_TD: torch.Tensor, gates_Tn: torch.Tensor) -> torch.Tensor:
        """x[k] + gates[k] * out: hc_expand with the identity as the stream mixing."""
        eye_Tnn = torch.eye(self.n, dtype=gates_Tn.dtype, device=gates_Tn.device).expand(x_TnD.shape[0], -1, -1)
        return self.expand_op(x_TnD, out_TD, gates_Tn, eye_Tnn)

    def weight_plan(self, p: str) -> WeightPlan:
        plan = {**self.hc_norm.weight_plan(p + "hc_norm.weight"),
                p + "input_mix_weight_down.weight": PlanEntry(self.down_rX, ()),
                p + "input_mix_weight_up.weight": PlanEntry(self.up_Xr, ())}
        if self.inject_nX is not None:
            plan[p + "block_inject_weight.weight"] = PlanEntry(self.inject_nX, ())
        return plan


__all__ = ["GatedHyperConnection", "GroupedRMSNorm"]
