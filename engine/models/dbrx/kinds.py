"""DBRX's block kinds (engine/models/blocks/registry.py imports this module): the residual kind "dbrx" (the prenorm
layer with LayerNorms without bias, and DBRX's checkpoint names), its FFN kind "dbrx" (the routed experts read from
w1 / v1 / w2) and head kind "dbrx" (the final LayerNorm, transformer.norm_f), and the checkpoint kind "dbrx" (the
embedding at transformer.wte).

The names, per layer i under transformer.blocks.{i}.: norm_attn_norm.norm_1 / norm_2 (the LayerNorms),
norm_attn_norm.attn.Wqkv [Q + 2 KV, D] (q, k and v rows stacked as moelink's qkv_proj holds them: read whole),
norm_attn_norm.attn.out_proj, ffn.router.layer [E, D], ffn.experts.mlp.w1 and v1 [E * I, D] (expert e's gate and up
rows at e * I: moelink's w13 [E, 2I, D] halves) and w2 [E * I, D] (expert e's down projection transposed: moelink's
w2 [E, D, I] holds it [D, I]). Float weights on one rank, or experts over EP ranks (each reads its experts' rows);
tensor parallelism is refused (the fused Wqkv and experts are not split here)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelink.moe.weight_plan import PlanEntry, Rearranged, WeightPlan

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ..blocks.checkpoint import CHECKPOINT, CheckpointKind, converted
from ..blocks.context import BuildContext
from ..blocks.ffn import FFN, RoutedFFN
from ..blocks.stream import HEAD, RESIDUAL, PlainHead, PreNormLayer
from ..layers import param


class LayerNorm(nn.Module):
    """nn.LayerNorm(D, bias=False) as DBRX runs it, in the model dtype, with RMSNorm's interface (forward,
    add_forward: the residual add then the norm, weight_plan) so the prenorm layer's flow and the plain head run it."""

    def __init__(self, size: int, eps: float, dtype, device=None):
        super().__init__()
        self.weight = param(size, dtype=dtype, device=device)
        self.eps = eps

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x_TD, (x_TD.shape[-1],), self.weight, None, self.eps)

    def add_forward(self, x_TD: torch.Tensor, residual_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s_TD = x_TD + residual_TD
        return self(s_TD), s_TD

    def weight_plan(self, name: str) -> WeightPlan:
        return {name: PlanEntry(self.weight, ())}


@RESIDUAL.register("dbrx")
class DbrxLayer(PreNormLayer):
    """The prenorm layer with LayerNorms; the attention never takes the fused decode input (its launch norms with
    RMSNorm), and DBRX's names."""

    def __init__(self, ctx: BuildContext, i, attention, attn_cfg, ffn):
        if ctx.tp is not None:
            raise ValueError(f"{ctx.cfg.architecture} under tensor parallelism is not supported: its fused Wqkv and "
                             f"experts are read whole (run it on one rank, or with expert parallelism).")
        super().__init__(ctx, i, attention, attn_cfg, ffn)
        cfg = ctx.cfg
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, ctx.device)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, ctx.device)
        self.mixer.fusion = None

    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        b = f"transformer.blocks.{layer_idx}."
        attn = self.mixer
        plan: WeightPlan = {}
        plan.update(self.input_layernorm.weight_plan(b + "norm_attn_norm.norm_1.weight"))
        plan.update(self.post_attention_layernorm.weight_plan(b + "norm_attn_norm.norm_2.weight"))
        proj = attn.qkv_proj
        if proj.rows != sum(proj.pieces) or not isinstance(proj.weight, nn.Parameter):
            raise ValueError(f"{cfg.architecture}: Wqkv is read into a float q/k/v stack without gaps.")
        plan[b + "norm_attn_norm.attn.Wqkv.weight"] = PlanEntry(proj.weight, ())
        plan.update(attn.o_proj.weight_plan(b + "norm_attn_norm.attn.out_proj.weight"))
        plan.update(self.ffn.weight_plan(b, layer_idx, cfg, spec, expert_ids, names))
        return plan


class DbrxFFN(RoutedFFN):
    """The routed experts, read from DBRX's fused w1 / v1 / w2 (this rank's experts' rows only)."""

    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        moe, inter, D = self.moe, cfg.moe_intermediate_size, cfg.hidden_size
        n = len(expert_ids)
        rows = (torch.cat([torch.arange(e * inter, (e + 1) * inter) for e in expert_ids]),)

        def stacked(t: torch.Tensor) -> torch.Tensor:  # [n * I, D] -> [n, I, D]
            return t.reshape(n, inter, D)

        return {
            p + "ffn.router.layer.weight": PlanEntry(moe.gate_GD, ()),
            p + "ffn.experts.mlp.w1": PlanEntry(Rearranged(moe.w13_EFD[:, :inter], stacked), (), rows),
            p + "ffn.experts.mlp.v1": PlanEntry(Rearranged(moe.w13_EFD[:, inter:], stacked), (), rows),
            p + "ffn.experts.mlp.w2": PlanEntry(Rearranged(moe.w2_EDI, lambda t: stacked(t).transpose(1, 2)), (),
                                                rows),
        }


FFN.add("dbrx", DbrxFFN)


@HEAD.register("dbrx")
class DbrxHead(PlainHead):
    """The final LayerNorm (transformer.norm_f), the last layer's residual add before it."""

    def __init__(self, ctx: BuildContext):
        cfg = ctx.cfg
        self.norm = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, ctx.device)
        self.modules = {"norm": self.norm}

    def weight_plan(self) -> WeightPlan:
        return self.norm.weight_plan("transformer.norm_f.weight")


def _plan(cfg: ModelConfig, spec: ArchSpec, plan: WeightPlan, names: frozenset[str]) -> WeightPlan:
    """The embedding at transformer.wte (the LM head keeps lm_head.weight)."""
    return {("transformer.wte.weight" if name == "model.embed_tokens.weight" else name): e for name, e in plan.items()}


CHECKPOINT.add("dbrx", CheckpointKind(_plan, converted))

__all__ = ["LayerNorm"]
