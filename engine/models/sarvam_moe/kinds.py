"""Sarvam-MoE's checkpoint kind, "sarvam_moe" (engine/models/blocks/registry.py imports this module): the published
names the blocks' plans are read under, as transformers' conversion renames them on load and back on save
(`model.word_embeddings`, `attention`, `attention.dense`, `attention.query_layernorm` / `key_layernorm`,
`mlp.gate.expert_bias`), and each layer's q, k and v read from the one `attention.query_key_value` tensor (weight,
and bias with attention_bias; rows q, then k, then v) cut by the layer's sizes. A name the checkpoint does not hold
in the published form is read as planned (a file in transformers 5's own names). Float q/k/v only: no FP8 release
of the fused tensor exists to read block scales from."""
from __future__ import annotations

import re

import torch

from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ..blocks.checkpoint import CHECKPOINT, CheckpointKind, aliased, converted

_RENAMES = ((re.compile(r"^model\.embed_tokens\."), "model.word_embeddings."),
            (re.compile(r"\.self_attn\.o_proj\."), ".attention.dense."),
            (re.compile(r"\.self_attn\.q_norm\."), ".attention.query_layernorm."),
            (re.compile(r"\.self_attn\.k_norm\."), ".attention.key_layernorm."),
            (re.compile(r"\.self_attn\."), ".attention."),
            (re.compile(r"\.mlp\.gate\.e_score_correction_bias$"), ".mlp.gate.expert_bias"))
_Q = re.compile(r"^(.*\.layers\.\d+\.)self_attn\.q_proj\.(weight|bias)$")


def published_name(name: str) -> str:
    for pattern, repl in _RENAMES:
        name = pattern.sub(repl, name)
    return name


class _FusedRows:
    """attention.query_key_value: `put` cuts the tensor read into q, k and v rows and fills each plan entry's part."""

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


def _plan(cfg: ModelConfig, spec: ArchSpec, plan: WeightPlan, names: frozenset[str]) -> WeightPlan:
    plan = aliased(cfg, spec, plan, names)
    a = cfg.attention
    sizes = (a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.value_head_dim)
    out: WeightPlan = {}
    dropped: set[str] = set()
    for name in plan:
        m = _Q.match(name)
        fused = f"{m.group(1)}attention.query_key_value.{m.group(2)}" if m is not None else None
        if m is None or name in names or fused not in names:
            continue
        parts = tuple(plan[f"{m.group(1)}self_attn.{x}_proj.{m.group(2)}"] for x in "qkv")
        if not all(isinstance(e.dest, torch.Tensor) and e.dest is parts[0].dest for e in parts):
            raise ValueError(f"{cfg.architecture}: checkpoint tensor {fused!r} (q, k and v fused) is read into a float "
                             f"q/k/v stack only: quantized attention weights are not supported for it.")
        dropped.update(f"{m.group(1)}self_attn.{x}_proj.{m.group(2)}" for x in "qkv")
        out[fused] = PlanEntry(_FusedRows(fused, parts, sizes), (), ())
    for name, entry in plan.items():
        if name not in dropped:
            published = published_name(name)
            out[published if not names or published in names else name] = entry
    return out


CHECKPOINT.add("sarvam_moe", CheckpointKind(_plan, converted))

__all__ = ["published_name"]
