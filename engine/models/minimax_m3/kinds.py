"""MiniMax-M3's checkpoint kind, "minimax_m3" (engine/models/blocks/registry.py imports this module): the names the
blocks' plans are read under. The blocks plan the published names (experts w1 / w3 / w2, the shared expert's and the
dense MLPs' gate_proj / up_proj, the indexer's index_{q,k}_proj); a text model written by transformers 5
(MiniMaxM3VLForCausalLM's save_pretrained: its own names) holds the experts fused (read as every family's fused
experts), the indexer under self_attn.indexer. (ArchSpec.weight_aliases), the shared expert under mlp. and the dense
MLPs' and shared expert's gate and up rows as one gate_up_proj [2I, D] (gate rows, then up rows: the stacked
weight's own order), read here as one tensor into both pieces. Float checkpoints only in that layout."""
from __future__ import annotations

import torch
from torch import nn

from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ..blocks.checkpoint import CHECKPOINT, CheckpointKind, aliased, converted


def _rows(source: tuple, width: int) -> torch.Tensor:
    """The checkpoint rows a piece's source index reads, as a row list (a TP rank's slice, or all `width`)."""
    if not source:
        return torch.arange(width)
    s = source[0]
    return s if isinstance(s, torch.Tensor) else torch.arange(width)[s]


def _joined(a: tuple, b: tuple) -> tuple | None:
    """One index covering two adjacent row ranges of the stacked weight, or None."""
    if len(a) == len(b) == 1 and isinstance(a[0], slice) and isinstance(b[0], slice) and a[0].stop == b[0].start:
        return (slice(a[0].start, b[0].stop),)
    return None


def _plan(cfg: ModelConfig, spec: ArchSpec, plan: WeightPlan, names: frozenset[str]) -> WeightPlan:
    out = dict(aliased(cfg, spec, plan, names))
    if not names:
        return out
    for name in list(out):
        if not name.endswith(".gate_proj.weight") or name in names:
            continue
        base = name[: -len("gate_proj.weight")]
        up, fused = base + "up_proj.weight", base.replace(f".{spec.moe_prefix}.", ".mlp.") + "gate_up_proj.weight"
        down = base + "down_proj.weight"
        if fused not in names or up not in out or up in names:
            continue
        g, u = out[name], out[up]
        index = _joined(g.index, u.index)
        if index is None or g.dest is not u.dest or not isinstance(g.dest, nn.Parameter):
            continue  # not a float stacked weight: left as planned (the loader names what is missing)
        shared = f".{spec.shared_experts}." in base
        width = cfg.moe.shared_expert_intermediate_size if shared else cfg.intermediate_size
        del out[name], out[up]
        out[fused] = PlanEntry(g.dest, index, (torch.cat([_rows(g.source, width), width + _rows(u.source, width)]),))
        if down not in names and down in out:  # the shared expert's down_proj beside its fused gate_up_proj
            out[fused.replace("gate_up_proj", "down_proj")] = out.pop(down)
    return out


CHECKPOINT.add("minimax_m3", CheckpointKind(_plan, converted))

__all__: list[str] = []
