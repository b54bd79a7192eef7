"""Manifold-constrained hyper-connections (mHC: DeepSeek-V4, GLM-5.3-Flash; engine/models/hyper_connections_config.py):
the residual stream is `hc_mult` parallel streams. Before a block (attention or MLP) a learned projection of the
normalised streams gives three mixes: `pre` collapses the streams into the block's input, `post` spreads the
block's output back over the streams, `comb` (made doubly stochastic by Sinkhorn-Knopp) mixes the input streams
into the output streams. A hyper-head collapses the streams once more before the final norm. Shared by DeepSeek-V4
(engine/models/deepseek_v4/blocks.py) and Hunyuan Hy4, whose independent hyper-connections have no `comb`
(HyperConnectionConfig.comb False: each stream keeps itself, the expansion run with the identity).

The mixes are computed in float32 whatever the activations' dtype, from float32 weights, as transformers'
DeepseekV4HyperConnection does; the collapse and the expansion run in the activations' dtype.

Legend: T tokens, n streams (hc_mult), D hidden.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moelink.kernels.hyper_connection import reference_hc_expand
from moelink.moe.weight_plan import PlanEntry, WeightPlan

from .hyper_connections_config import HyperConnectionConfig

if TYPE_CHECKING:
    from moelink.kernels.ops import Kernels


def _unweighted_norm_f32(x32: torch.Tensor, eps: float) -> torch.Tensor:
    return x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)


class HyperConnection(nn.Module):
    """One block's mixes: `collapse(x_TnD)` gives the block input and keeps (post, comb) for `residual` (the kernel
    strategy's `hc_expand`: Triton fuses the mix with the residual add) or `expand` (its reference)."""

    def __init__(self, cfg: HyperConnectionConfig, hidden_size: int, rms_norm_eps: float, device=None,
                 kernels: Kernels | None = None):
        super().__init__()
        n = cfg.hc_mult
        self.cfg, self.eps = cfg, rms_norm_eps
        self.expand_op = kernels.hc_expand if kernels is not None else reference_hc_expand
        f32 = dict(dtype=torch.float32, device=device)
        # (the names keep DeepSeek-V4's shapes; without comb, Hy4's: 2n rows and 2 scales)
        self.fn_MnD = nn.Parameter(torch.empty(cfg.mix_rows, n * hidden_size, **f32), requires_grad=False)
        self.base_M = nn.Parameter(torch.empty(cfg.mix_rows, **f32), requires_grad=False)
        self.scale_3 = nn.Parameter(torch.empty(3 if cfg.comb else 2, **f32), requires_grad=False)

    def mixes(self, x_TnD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pre_Tn, post_Tn, comb_Tnn) in float32; without comb (Hy4) comb is the identity: each stream keeps
        itself."""
        n, T, c = self.cfg.hc_mult, x_TnD.shape[0], self.cfg
        flat = _unweighted_norm_f32(x_TnD.reshape(T, -1).float(), self.eps)
        mixes = F.linear(flat, self.fn_MnD)
        if not c.comb:
            pre_w, post_w = mixes.split([n, n], dim=-1)
            pre_b, post_b = self.base_M.split([n, n])
            s_pre, s_post = self.scale_3.unbind(0)
            pre = torch.sigmoid(pre_w * s_pre + pre_b) + c.eps
            post = c.post_mult * torch.sigmoid(post_w * s_post + post_b) + c.eps
            eye = torch.eye(n, dtype=torch.float32, device=x_TnD.device).expand(T, n, n).contiguous()
            return pre, post, eye
        pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base_M.split([n, n, n * n])
        s_pre, s_post, s_comb = self.scale_3.unbind(0)
        pre = torch.sigmoid(pre_w * s_pre + pre_b) + self.cfg.eps
        post = c.post_mult * torch.sigmoid(post_w * s_post + post_b) + (c.eps if c.post_eps else 0.0)
        comb = torch.softmax(comb_w.view(T, n, n) * s_comb + comb_b.view(n, n), dim=-1) + self.cfg.eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.cfg.eps)  # Sinkhorn-Knopp: columns first, as transformers
        for _ in range(self.cfg.sinkhorn_iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.cfg.eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.cfg.eps)
        return pre, post, comb

    def collapse(self, x_TnD: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(the block input [T, D], the (post, comb) that `expand` takes)."""
        pre, post, comb = self.mixes(x_TnD)
        return (pre.unsqueeze(-1) * x_TnD).sum(dim=1).to(x_TnD.dtype), (post, comb)

    @staticmethod
    def expand(x_TnD: torch.Tensor, out_TD: torch.Tensor, post_comb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The streams after the block: post[k] * out + sum_j comb[j, k] * x[j] (comb read transposed; the
        reference, kernels/hyper_connection.reference_hc_expand)."""
        return reference_hc_expand(x_TnD, out_TD, *post_comb)

    def residual(self, x_TnD: torch.Tensor, out_TD: torch.Tensor,
                 post_comb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """`expand` through the kernel strategy's op."""
        return self.expand_op(x_TnD, out_TD, *post_comb)

    def weight_plan(self, prefix: str) -> WeightPlan:
        """`{prefix}_fn`, `_base`, `_scale` (the published names: hc_attn_fn, hc_ffn_base, ...)."""
        return {prefix + "_fn": PlanEntry(self.fn_MnD, ()), prefix + "_base": PlanEntry(self.base_M, ()),
                prefix + "_scale": PlanEntry(self.scale_3, ())}


class MeanHyperHead(nn.Module):
    """GLM-5.3-Flash's final collapse: the plain mean of the streams (no weights), in the activations' dtype."""

    def forward(self, x_TnD: torch.Tensor) -> torch.Tensor:
        return x_TnD.mean(dim=1)


class HyperHead(nn.Module):
    """The final collapse of the streams before the model's norm: sigmoid(mix * scale + base) + eps per stream."""

    def __init__(self, cfg: HyperConnectionConfig, hidden_size: int, rms_norm_eps: float, device=None):
        super().__init__()
        n = cfg.hc_mult
        self.cfg, self.eps = cfg, rms_norm_eps
        f32 = dict(dtype=torch.float32, device=device)
        self.fn_nnD = nn.Parameter(torch.empty(n, n * hidden_size, **f32), requires_grad=False)
        self.base_n = nn.Parameter(torch.empty(n, **f32), requires_grad=False)
        self.scale_1 = nn.Parameter(torch.empty(1, **f32), requires_grad=False)

    def forward(self, x_TnD: torch.Tensor) -> torch.Tensor:
        flat = _unweighted_norm_f32(x_TnD.reshape(x_TnD.shape[0], -1).float(), self.eps)
        pre = torch.sigmoid(F.linear(flat, self.fn_nnD) * self.scale_1 + self.base_n) + self.cfg.eps
        return (pre.unsqueeze(-1) * x_TnD).sum(dim=1).to(x_TnD.dtype)

    def weight_plan(self, prefix: str) -> WeightPlan:
        """`{prefix}hc_fn`, `hc_base`, `hc_scale` (model.hc_head.* as save_pretrained writes them)."""
        return {prefix + "hc_fn": PlanEntry(self.fn_nnD, ()), prefix + "hc_base": PlanEntry(self.base_n, ()),
                prefix + "hc_scale": PlanEntry(self.scale_1, ())}


__all__ = ["HyperConnection", "HyperHead", "MeanHyperHead"]
