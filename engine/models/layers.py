"""Building blocks shared by the decoder's layer kinds: the per-step context, norm, dense MLP.

Legend: T tokens in the flat batch, D hidden, I intermediate size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from moelink.kernels.attention import AttentionMetadata


@dataclass
class ForwardContext:
    """Per-step inputs every layer needs besides its activations."""

    attn: AttentionMetadata
    # Per layer, the cache tensors of its attention kind (layer_configs: cache_shapes): (k_cache_BLKH,
    # v_cache_BLKH) for GQA, (latent_cache_BLR,) for MLA.
    kv_caches: list[tuple[torch.Tensor, ...]]


def param(*shape, dtype, device) -> nn.Parameter:
    """An uninitialised, frozen parameter (the loader fills it from the checkpoint)."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, kernels, dtype, device=None):
        super().__init__()
        self.weight = param(size, dtype=dtype, device=device)
        self.eps = eps
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x_TD: torch.Tensor, residual_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kernels.add_rms_norm(x_TD, residual_TD, self.weight, self.eps)

    def weight_plan(self, name: str) -> dict[str, tuple]:
        return {name: (self.weight, ())}


class DenseMLP(nn.Module):
    """SiLU-gated MLP with gate and up stacked (gate_up_proj = [gate; up]): the dense layers, and the shared
    experts of DeepSeek / GLM MoE layers (one MLP of n_shared_experts * moe_intermediate_size)."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype, device=None):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = param(2 * intermediate_size, hidden_size, dtype=dtype, device=device)
        self.down_proj = param(hidden_size, intermediate_size, dtype=dtype, device=device)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        gate_TI, up_TI = F.linear(x_TD, self.gate_up_proj).chunk(2, dim=-1)
        return F.linear(F.silu(gate_TI) * up_TI, self.down_proj)

    def weight_plan(self, p: str) -> dict[str, tuple]:
        """Checkpoint names under `p` ("model.layers.{i}.mlp." or "...mlp.shared_experts.") → (parameter, index)."""
        inter = self.intermediate_size
        return {p + "gate_proj.weight": (self.gate_up_proj, (slice(0, inter),)),
                p + "up_proj.weight": (self.gate_up_proj, (slice(inter, 2 * inter),)),
                p + "down_proj.weight": (self.down_proj, ())}
