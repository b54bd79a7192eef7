"""Llama 4's block kinds (engine/models/blocks/registry.py imports this module): the FFN kind "llama4_moe", its MoE
block: the routed experts (top-1 by the router's logit, the sigmoid of that logit scaling the expert's input:
MoEConfig.router_weight_on_input, RouterConfig "topk_sigmoid") beside one shared expert, read from Llama 4's names.

The names, per MoE layer i under model.layers.{i}.feed_forward.: router.weight [E, D]; experts.gate_up_proj
[E, D, 2F] (used as x @ W: the gate's F columns, then the up's; moelink's w13 [E, 2F, D] is it transposed) and
experts.down_proj [E, F, D] (moelink's w2 [E, D, F] transposed), this rank's experts' rows only under expert
parallelism; shared_expert.{gate,up,down}_proj (a dense MLP F wide, whole on every rank under expert parallelism).
Under tensor parallelism without expert parallelism each rank holds every expert's channels [i0, i0 + w) of F
(engine/tp/experts.ExpertShard): the gate columns [i0, i0 + w) and up columns [F + i0, F + i0 + w) of gate_up_proj,
the rows [i0, i0 + w) of down_proj, and the shared expert split alike; the partial sums are all-reduced together.
The routing weight scales every rank's copy of the input the same way, so the channel split is exact."""
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
    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        m, moe = f"{p}{spec.moe_prefix}.", self.moe
        experts: slice | torch.Tensor = slice(None)
        if expert_ids != list(range(cfg.num_experts)):  # this rank's experts (expert parallelism)
            experts = torch.tensor(expert_ids, dtype=torch.long)
        gate_up: tuple = (experts,) if isinstance(experts, torch.Tensor) else ()
        down: tuple = gate_up
        shard = self.expert_shard
        if shard is not None:  # this rank's channels of every expert (tensor parallelism without EP)
            i0, w, F = shard.i0, shard.w, shard.inter
            cols = torch.cat([torch.arange(i0, i0 + w), F + torch.arange(i0, i0 + w)])
            gate_up, down = (experts, slice(None), cols), (experts, slice(i0, i0 + w))
        plan: WeightPlan = {
            m + f"{spec.router}.weight": PlanEntry(moe.gate_GD, ()),
            m + "experts.gate_up_proj": PlanEntry(Rearranged(moe.w13_EFD, _transposed), (), gate_up),
            m + "experts.down_proj": PlanEntry(Rearranged(moe.w2_EDI, _transposed), (), down),
        }
        plan.update(self.shared_moe.shared.weight_plan(f"{m}{spec.shared_experts}."))
        return plan


FFN.add("llama4_moe", Llama4MoE)

__all__ = ["Llama4MoE"]
