"""PhiMoE's block kinds (engine/models/blocks/registry.py imports this module): the residual kind "phimoe" (the
prenorm layer with LayerNorms that have a bias: transformers' nn.LayerNorm(hidden_size, eps=rms_norm_eps)) and the
head kind "phimoe" (the final LayerNorm, model.norm.weight / .bias, and the LM head's bias lm_head.bias where
config.json's lm_head_bias says so). Its router is the routing kind "sparsemixer" (moe/router.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ..blocks.context import BuildContext
from ..blocks.stream import HEAD, RESIDUAL, PlainHead, PreNormLayer
from ..layers import param


class LayerNorm(nn.Module):
    """nn.LayerNorm(D) with its bias, in the model dtype, with RMSNorm's interface (forward, add_forward: the residual
    add then the norm, weight_plan of "<name>.weight" and its "<name>.bias") so the prenorm flow and the plain head run
    it. Plain torch (F.layer_norm) on every device."""

    def __init__(self, size: int, eps: float, dtype, device=None):
        super().__init__()
        self.weight = param(size, dtype=dtype, device=device)
        self.bias = param(size, dtype=dtype, device=device)
        self.eps = eps

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x_TD, (x_TD.shape[-1],), self.weight, self.bias, self.eps)

    def add_forward(self, x_TD: torch.Tensor, residual_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s_TD = x_TD + residual_TD
        return self(s_TD), s_TD

    def weight_plan(self, name: str) -> WeightPlan:
        base = name.removesuffix(".weight")
        return {name: PlanEntry(self.weight, ()), base + ".bias": PlanEntry(self.bias, ())}


@RESIDUAL.register("phimoe")
class PhimoeLayer(PreNormLayer):
    """The prenorm layer with LayerNorms; the attention never takes the fused decode input (its launch norms with
    RMSNorm). The checkpoint names are the prenorm layer's (input_layernorm, post_attention_layernorm: their .bias
    beside each .weight)."""

    def __init__(self, ctx: BuildContext, i, attention, attn_cfg, ffn):
        super().__init__(ctx, i, attention, attn_cfg, ffn)
        cfg = ctx.cfg
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, ctx.device)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, ctx.device)
        self.mixer.fusion = None


@HEAD.register("phimoe")
class PhimoeHead(PlainHead):
    """The final LayerNorm (model.norm), the last layer's residual add before it; the LM head's bias where
    config.json's lm_head_bias is true (the decoder holds it: Head.lm_head_bias_name)."""

    def __init__(self, ctx: BuildContext):
        cfg = ctx.cfg
        self.norm = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, ctx.device)
        self.modules = {"norm": self.norm}
        self.lm_head_bias_name = "lm_head.bias" if (cfg.hf_config or {}).get("lm_head_bias") else ""
