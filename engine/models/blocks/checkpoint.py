"""Checkpoint kinds: how a family's checkpoint differs from the names and values its blocks' plans give, and what
the model does with what it loaded. "hf" is every family's but DeepSeek-V4's (its published names and FP8 formats:
engine/models/deepseek_v4/blocks.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from moelink.moe.weight_plan import WeightPlan

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ..layers import RMSNorm
from .registry import Registry


@dataclass(frozen=True)
class CheckpointKind:
    """plan(cfg, spec, the model's plan, the checkpoint's names) -> the plan the loader reads;
    after_load(cfg, model, updated): once every parameter is filled (updated None), or once a weight update
    (engine/rl/weights.py) wrote the parameters whose ids `updated` holds: the conversions apply to those only."""

    plan: Callable[[ModelConfig, ArchSpec, WeightPlan, frozenset[str]], WeightPlan]
    after_load: Callable[..., None]


def aliased(cfg: ModelConfig, spec: ArchSpec, plan: WeightPlan, names: frozenset[str]) -> WeightPlan:
    """`plan` with each entry the checkpoint holds under its transformers 5 name only (ArchSpec.weight_aliases:
    MiMo-V2-Flash's `attention_sink_bias` saved as `sinks`) read under that name."""
    if not spec.weight_aliases or not names:
        return plan
    out: WeightPlan = {}
    for name, entry in plan.items():
        for published, alias in spec.weight_aliases:
            if name not in names and name.endswith(published) and name[: -len(published)] + alias in names:
                name = name[: -len(published)] + alias
        out[name] = entry
    return out


def converted(cfg: ModelConfig, model: nn.Module, updated: set[int] | None = None) -> None:
    """Modules that convert what they loaded (an FP8 kv_b_proj dequantized for MLA's absorption) do it now;
    zero-centred norms (ModelConfig.norm_weight_offset) become plain ones. `updated`: after a weight update, the
    ids of the parameters it wrote (only those are converted: the others hold their converted values already)."""
    if cfg.norm_weight_offset:
        for module in model.modules():
            if isinstance(module, RMSNorm) and (updated is None or id(module.weight) in updated):
                module.weight.add_(cfg.norm_weight_offset)
    for module in model.modules():
        if module is not model and hasattr(module, "process_weights_after_loading"):
            # A module's conversion that takes no `updated` cannot convert part of its weights: an update fails
            # there, naming it (engine/rl/weights.py), rather than convert twice what it did not write.
            if updated is None:
                module.process_weights_after_loading()
            else:
                module.process_weights_after_loading(updated)


CHECKPOINT: Registry[CheckpointKind] = Registry("checkpoint")
CHECKPOINT.add("hf", CheckpointKind(aliased, converted))

__all__ = ["CHECKPOINT", "CheckpointKind", "aliased"]
