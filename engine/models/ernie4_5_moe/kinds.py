"""ERNIE-4.5-MoE's checkpoint kind, "ernie4_5_moe" (engine/models/blocks/registry.py imports this module): the
"hf" kind's names (and its transformers 5 alias of the correction bias), with the correction bias read from its
stored shape [1, E] (Ernie4_5_MoeStatics keeps one row per expert group, and ERNIE has one group) into the router's
[E]."""
from __future__ import annotations

from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ..blocks.checkpoint import CHECKPOINT, CheckpointKind, aliased, converted


def _plan(cfg: ModelConfig, spec: ArchSpec, plan: WeightPlan, names: frozenset[str]) -> WeightPlan:
    out = aliased(cfg, spec, plan, names)
    return {name: PlanEntry(e.dest, e.index, (0,)) if name.endswith("moe_statics.e_score_correction_bias") else e
            for name, e in out.items()}


CHECKPOINT.add("ernie4_5_moe", CheckpointKind(_plan, converted))
