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
    after_load(cfg, model): once every parameter is filled."""

    plan: Callable[[ModelConfig, ArchSpec, WeightPlan, frozenset[str]], WeightPlan]
    after_load: Callable[[ModelConfig, nn.Module], None]


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


def converted(cfg: ModelConfig, model: nn.Module) -> None:
    """Modules that convert what they loaded (an FP8 kv_b_proj dequantized for MLA's absorption) do it now;
    zero-centred norms (ModelConfig.norm_weight_offset) become plain ones."""
    if cfg.norm_weight_offset:
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.add_(cfg.norm_weight_offset)
    for module in model.modules():
        if module is not model and hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()


CHECKPOINT: Registry[CheckpointKind] = Registry("checkpoint")
CHECKPOINT.add("hf", CheckpointKind(aliased, converted))

__all__ = ["CHECKPOINT", "CheckpointKind", "aliased"]
