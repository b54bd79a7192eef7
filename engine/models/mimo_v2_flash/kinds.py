"""MiMo-V2's checkpoint kind "mimo_v2_fused_qkv" (engine/models/blocks/registry.py imports this module): the layout
vLLM registers as MiMoV2ForCausalLM, MiMo-V2-Flash's model with each layer's q, k and v projections stored as one
tensor, self_attn.qkv_proj.weight (rows: every q row, then every k row, then every v row; self_attn.qkv_proj.bias
likewise where attention_bias). The engine's plan names q_proj / k_proj / v_proj; where the checkpoint holds the
fused tensor instead, the three entries become one that reads it once and cuts it by the layer's own sizes
(num_attention_heads * head_dim, then the layer's kv heads * head_dim and * v_head_dim: a sliding layer has twice
the kv heads of a full one), each part then read as the plan's own entry would (its TP rows, its place in the
stack). Float weights only: an FP8 projection's block scales are per piece, and no fused FP8 release exists to
read them from."""
from __future__ import annotations

import re

import torch

from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ..blocks.checkpoint import CHECKPOINT, CheckpointKind, aliased, converted

_Q = re.compile(r"^(.*\.layers\.(\d+)\.self_attn\.)q_proj\.(weight|bias)$")


class FusedRows:
    """One checkpoint tensor whose rows are the stacked parts of several plan entries: `put` cuts the tensor read
    into `sizes` rows and fills each part's entry (its `source` rows of the part, into `dest[index]`)."""

    def __init__(self, name: str, entries: tuple[PlanEntry, ...], sizes: tuple[int, ...]):
        self.name, self.entries, self.sizes = name, entries, sizes
        self.dest = entries[0].dest  # the stacked parameter every part fills (a weight update's `written`)

    def put(self, src: torch.Tensor, device) -> None:
        if src.shape[0] != sum(self.sizes):
            raise ValueError(f"checkpoint tensor {self.name!r} has {src.shape[0]} rows, expected {sum(self.sizes)} "
                             f"(q, k, v rows {', '.join(map(str, self.sizes))} from config.json).")
        for part, (dest, index, source) in zip(torch.split(src, list(self.sizes)), self.entries):
            if source:
                part = part[source]
            target = dest[index] if index else dest
            if tuple(part.shape) != tuple(target.shape):
                raise ValueError(f"checkpoint tensor {self.name!r}: a part read as {tuple(part.shape)}, expected "
                                 f"{tuple(target.shape)} from config.json.")
            if part.is_floating_point() and not torch.isfinite(part).all():  # host sync: load time
                raise ValueError(f"checkpoint tensor {self.name!r} holds non-finite values: the checkpoint is corrupt.")
            target.copy_(part.to(device=device, dtype=target.dtype))


def _sizes(cfg: ModelConfig, layer: int) -> tuple[int, int, int]:
    """The checkpoint's q, k and v rows in layer `layer` (its own attention config: a sliding layer's kv heads)."""
    a = cfg.layer_attention[layer] if cfg.layer_attention else cfg.attention
    return (a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * (a.v_head_dim or a.head_dim))


def _plan(cfg: ModelConfig, spec: ArchSpec, plan: WeightPlan, names: frozenset[str]) -> WeightPlan:
    """The plan with each layer's q/k/v entries (weight, and bias where it has one) read from the fused tensor where
    the checkpoint holds that instead of the three (a checkpoint in MiMo-V2-Flash's own names reads as it is)."""
    plan = aliased(cfg, spec, plan, names)
    fused: dict[str, PlanEntry] = {}
    dropped: set[str] = set()
    for name in plan:
        m = _Q.match(name)
        if m is None or name in names or f"{m.group(1)}qkv_proj.{m.group(3)}" not in names:
            continue
        p, layer, kind = m.group(1), int(m.group(2)), m.group(3)
        parts = tuple(plan[f"{p}{x}_proj.{kind}"] for x in "qkv")
        target = f"{p}qkv_proj.{kind}"
        if not all(isinstance(e.dest, torch.Tensor) and e.dest is parts[0].dest for e in parts):
            raise ValueError(f"{cfg.architecture}: checkpoint tensor {target!r} (q, k and v fused) is read into a "
                             f"float q/k/v stack only: quantized attention weights are not supported for it.")
        dropped.update(f"{p}{x}_proj.{kind}" for x in "qkv")
        fused[target] = PlanEntry(FusedRows(target, parts, _sizes(cfg, layer)), (), ())
    return {**{n: e for n, e in plan.items() if n not in dropped}, **fused}


CHECKPOINT.add("mimo_v2_fused_qkv", CheckpointKind(_plan, converted))

__all__ = ["FusedRows"]
