"""Cohere2-MoE's block kinds (engine/models/blocks/registry.py imports this module): the residual kind "cohere2_moe"
(the shared parallel layer, blocks/stream.ParallelLayer, with Cohere's LayerNorm where config.json names no
rms_norm_eps), the head kind "cohere2_moe" (the final norm, the same choice) and the checkpoint kind "cohere2_moe"
(transformers' names, then logit_scale and the "average" shared-expert combination folded into the weights).

Why folding: logits * logit_scale is the LM head applied to the final norm's output times logit_scale, and the norm's
output is its weight times the normed value, so the scale moves into the final norm's weight (the LM head may be
the embedding table: tied, as published); (routed + shared) / 2 halves every expert's and the shared MLP's down
projection, exactly (a power of two). Each folds in one rounding (logit_scale 0.0625, as published: none)."""
from __future__ import annotations

import torch
from torch import nn

from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ...config.model import ModelConfig
from ..blocks.checkpoint import CHECKPOINT, CheckpointKind, aliased, converted
from ..blocks.context import BuildContext
from ..blocks.stream import HEAD, RESIDUAL, PlainHead, ParallelLayer
from ..layers import RMSNorm, param


class CohereLayerNorm(nn.Module):
    """transformers' Cohere2LayerNorm: (x - mean) * rsqrt(var + eps) times the weight, no bias, computed in float32
    (the input cast to float32 whatever its dtype, as transformers does) and cast back once; RMSNorm's interface
    (forward, add_forward: the residual add then the norm, weight_plan)."""

    def __init__(self, size: int, eps: float, dtype, device=None):
        super().__init__()
        self.weight = param(size, dtype=dtype, device=device)
        self.eps = eps

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        x = x_TD.to(torch.float32)
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return (self.weight.to(torch.float32) * ((x - mean) * torch.rsqrt(var + self.eps))).to(x_TD.dtype)

    def add_forward(self, x_TD: torch.Tensor, residual_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s_TD = x_TD + residual_TD
        return self(s_TD), s_TD

    def weight_plan(self, name: str) -> WeightPlan:
        return {name: PlanEntry(self.weight, ())}


def _norm(ctx: BuildContext) -> nn.Module:
    cfg = ctx.cfg
    if cfg.hf_config.get("rms_norm_eps") is not None:
        return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.kernels, cfg.dtype, ctx.device)
    return CohereLayerNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, ctx.device)  # the reader's layer_norm_eps


@RESIDUAL.register("cohere2_moe")
class Cohere2MoeLayer(ParallelLayer):
    """The parallel layer with Cohere's norm."""

    def make_norm(self, ctx: BuildContext) -> nn.Module:
        return _norm(ctx)


@HEAD.register("cohere2_moe")
class Cohere2MoeHead(PlainHead):
    """The final norm (model.norm), Cohere's LayerNorm or RMSNorm as the layers', the last layer's residual add
    before it; logit_scale folded into its weight (module docstring)."""

    def __init__(self, ctx: BuildContext):
        self.norm = _norm(ctx)
        self.modules = {"norm": self.norm}


def _factors(cfg: ModelConfig, model: nn.Module) -> list[tuple[torch.Tensor, float]]:
    """(tensor, the factor it is multiplied by) for every weight a constant folds into."""
    hf = cfg.hf_config
    out = [(model.norm.weight, float(hf.get("logit_scale", 1.0)))]
    if hf.get("num_shared_experts") and hf.get("shared_expert_combination_strategy", "average") == "average":
        for layer in model.layers:
            shared = getattr(layer.ffn, "shared_moe", None)
            if shared is not None:
                out += [(layer.moe.w2_EDI, 0.5), (shared.shared.down_proj.weight, 0.5)]
    return out


def _after_load(cfg: ModelConfig, model: nn.Module, updated: set[int] | None = None) -> None:
    """The constants folded into the weights just written (all after a load; after a weight update, the ones in
    `updated`, each once), then the "hf" kind's conversions."""
    with torch.no_grad():
        for t, factor in _factors(cfg, model):
            if factor == 1.0 or (updated is not None and id(t) not in updated):
                continue
            if not t.is_floating_point() or t.element_size() < 2:
                raise ValueError(f"{cfg.architecture}: its logit_scale and shared-expert average fold into float "
                                 f"weights; this one is {t.dtype} (quantized checkpoints are not supported).")
            t.mul_(factor)
    converted(cfg, model, updated)


CHECKPOINT.add("cohere2_moe", CheckpointKind(aliased, _after_load))

__all__ = ["Cohere2MoeHead", "Cohere2MoeLayer", "CohereLayerNorm"]
