"""Llama 4's block kinds (engine/models/blocks/registry.py imports this module): the FFN kind "llama4_moe", its MoE
block: the routed experts (top-1 by the router's logit, the sigmoid of that logit scaling the expert's input:
MoEConfig.router_weight_on_input, RouterConfig "topk_sigmoid") beside one shared expert, read from Llama 4's names.

The names, per MoE layer i under model.layers.{i}.feed_forward.: router.weight [E, D]; experts.gate_up_proj
[E, D, 2F] (used as x @ W: the gate's F columns, then the up's; moelink's w13 [E, 2F, D] is it transposed) and
experts.down_proj [E, F, D] (moelink's w2 [E, D, F] transposed), this rank's experts' rows only under expert
parallelism; shared_expert.{gate,up,down}_proj (a dense MLP F wide, whole on every rank). Tensor parallelism without
expert parallelism is refused (the experts would be split by channels; not mapped for the fused layout yet)."""
from __future__ import annotations

import torch

from moelink.moe.weight_plan import PlanEntry, Rearranged, WeightPlan

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ..blocks.context import BuildContext
from ..blocks.ffn import FFN, RoutedSharedFFN


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """[E', A, B] as read -> [E', B, A], the layout moelink's stacks hold."""
    return t.transpose(1, 2)


class Llama4MoE(RoutedSharedFFN):
    def __init__(self, ctx: BuildContext, i: int):
        if ctx.tp is not None and ctx.ep is None:
            raise ValueError(f"{ctx.cfg.architecture} under tensor parallelism without expert parallelism is not "
                             f"supported yet: its fused experts are not split by channels (run it with expert "
                             f"parallelism, or on one rank).")
        super().__init__(ctx, i)

    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        m, moe = f"{p}{spec.moe_prefix}.", self.moe
        rows: tuple = ()
        if expert_ids != list(range(cfg.num_experts)):  # this rank's experts (expert parallelism)
            rows = (torch.tensor(expert_ids, dtype=torch.long),)
        plan: WeightPlan = {
            m + f"{spec.router}.weight": PlanEntry(moe.gate_GD, ()),
            m + "experts.gate_up_proj": PlanEntry(Rearranged(moe.w13_EFD, _transposed), (), rows),
            m + "experts.down_proj": PlanEntry(Rearranged(moe.w2_EDI, _transposed), (), rows),
        }
        plan.update(self.shared_moe.shared.weight_plan(f"{m}{spec.shared_experts}."))
        return plan


FFN.add("llama4_moe", Llama4MoE)

__all__ = ["Llama4MoE"]
