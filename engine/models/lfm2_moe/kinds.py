"""LFM2-MoE's block kinds (engine/models/blocks/registry.py imports this module): the FFN kind "lfm2_moe" (the
routed experts read per expert as published, feed_forward.experts.{e}.w1 / w3 / w2, or fused as transformers 5
writes them, feed_forward.experts.gate_up_proj / down_proj; without use_expert_bias the selection bias stays zero and
is read from nothing) and the checkpoint kind "lfm2_moe" (LFM2's names for the norms, the attention's output
projection and q/k norms, the dense MLPs and the final norm)."""
from __future__ import annotations

from moelink.moe.weight_plan import WeightPlan

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ..blocks.checkpoint import CHECKPOINT, CheckpointKind, converted
from ..blocks.ffn import FFN, RoutedFFN, fused_experts_name

# The blocks' names (left) as LFM2 writes them (right), per layer under model.layers.{i}.
_LAYER_NAMES = (("input_layernorm.", "operator_norm."), ("post_attention_layernorm.", "ffn_norm."),
                ("self_attn.o_proj.", "self_attn.out_proj."), ("self_attn.q_norm.", "self_attn.q_layernorm."),
                ("self_attn.k_norm.", "self_attn.k_layernorm."), ("mlp.gate_proj.", "feed_forward.w1."),
                ("mlp.up_proj.", "feed_forward.w3."), ("mlp.down_proj.", "feed_forward.w2."),
                ("mlp.", "feed_forward."))


class Lfm2MoeFFN(RoutedFFN):
    """The routed experts, per expert or fused as the checkpoint holds them (the fused layout is told by
    feed_forward.experts.gate_up_proj, not the engine's mlp. name)."""

    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        if f"{p}{spec.moe_prefix}.experts.gate_up_proj" in names:
            names = names | {fused_experts_name(layer_idx)}  # planned under mlp., renamed by the checkpoint kind
        plan = super().weight_plan(p, layer_idx, cfg, spec, expert_ids, names)
        if not cfg.hf_config.get("use_expert_bias", True):  # transformers selects on the scores alone
            plan = {k: e for k, e in plan.items() if not k.endswith("." + spec.correction_bias)}
        return plan


FFN.add("lfm2_moe", Lfm2MoeFFN)


def _name(name: str) -> str:
    if name == "model.norm.weight":
        return "model.embedding_norm.weight"
    if not name.startswith("model.layers."):
        return name
    head, _, rest = name[len("model.layers."):].partition(".")
    for ours, theirs in _LAYER_NAMES:
        if rest.startswith(ours):
            return f"model.layers.{head}.{theirs}{rest[len(ours):]}"
    return name


def _plan(cfg: ModelConfig, spec: ArchSpec, plan: WeightPlan, names: frozenset[str]) -> WeightPlan:
    return {_name(name): e for name, e in plan.items()}


CHECKPOINT.add("lfm2_moe", CheckpointKind(_plan, converted))

__all__ = ["Lfm2MoeFFN"]
