"""Building blocks shared by the MoE decoders: norm, attention over the paged KV cache, dense MLP.

Legend: T tokens in the flat batch, D hidden, N query heads, K kv heads,
H head dim, I intermediate size.
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
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k_cache_BLKH, v_cache_BLKH)


def _param(*shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, kernels, dtype, device=None):
        super().__init__()
        self.weight = _param(size, dtype=dtype, device=device)
        self.eps = eps
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x_TD: torch.Tensor, residual_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kernels.add_rms_norm(x_TD, residual_TD, self.weight, self.eps)


class PagedAttention(nn.Module):
    """GQA self-attention; q, k, v projections stacked into one matmul (qkv_proj)."""

    def __init__(self, layer_idx: int, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 qk_norm_eps: float | None, cos_sin_PH: torch.Tensor, kernels, dtype, device=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.scale = head_dim**-0.5
        self.kernels = kernels
        self.qkv_proj = _param(self.q_size + 2 * self.kv_size, hidden_size, dtype=dtype, device=device)
        self.o_proj = _param(hidden_size, self.q_size, dtype=dtype, device=device)
        # Qwen3 normalises each head's q and k before rotary; Mixtral does not.
        self.q_norm = RMSNorm(head_dim, qk_norm_eps, kernels, dtype, device) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps, kernels, dtype, device) if qk_norm_eps is not None else None
        self.register_buffer("cos_sin_PH", cos_sin_PH, persistent=False)

    def forward(self, positions_T: torch.Tensor, x_TD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        T = x_TD.shape[0]
        qkv = F.linear(x_TD, self.qkv_proj)
        q_TNH = qkv[:, : self.q_size].view(T, self.num_heads, self.head_dim)
        k_TKH = qkv[:, self.q_size : self.q_size + self.kv_size].view(T, self.num_kv_heads, self.head_dim)
        v_TKH = qkv[:, self.q_size + self.kv_size :].view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q_TNH, k_TKH = self.q_norm(q_TNH), self.k_norm(k_TKH)
        q_TNH, k_TKH = self.kernels.rotary(q_TNH, k_TKH, positions_T, self.cos_sin_PH)
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        self.kernels.write_kv(k_TKH.contiguous(), v_TKH.contiguous(), k_cache, v_cache, ctx.attn.slot_mapping_T)
        o_TNH = self.kernels.paged_attention(q_TNH.contiguous(), k_cache, v_cache, ctx.attn, self.scale)
        return F.linear(o_TNH.reshape(T, self.q_size), self.o_proj)


class DenseMLP(nn.Module):
    """SiLU-gated MLP with gate and up stacked (gate_up_proj = [gate; up])."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype, device=None):
        super().__init__()
        self.gate_up_proj = _param(2 * intermediate_size, hidden_size, dtype=dtype, device=device)
        self.down_proj = _param(hidden_size, intermediate_size, dtype=dtype, device=device)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        gate_TI, up_TI = F.linear(x_TD, self.gate_up_proj).chunk(2, dim=-1)
        return F.linear(F.silu(gate_TI) * up_TI, self.down_proj)
