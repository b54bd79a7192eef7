"""Ling's hybrid checkpoint kind, "ling" (engine/models/blocks/registry.py imports this module): the published names
the blocks' plans are read under. The blocks plan transformers' names (`model.embed_tokens`, `self_attn`, `o_proj`);
Ling publishes `model.word_embeddings`, `attention` and `attention.dense`, which transformers' conversion renames on
load and back on save. A name the checkpoint does not hold in the published form is read as planned (a file written
in transformers 5's own names)."""
from __future__ import annotations

import re

from moelink.moe.weight_plan import WeightPlan

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ..blocks.checkpoint import CHECKPOINT, CheckpointKind, aliased, converted

_RENAMES = ((re.compile(r"^model\.embed_tokens\."), "model.word_embeddings."),
            (re.compile(r"\.self_attn\.o_proj\."), ".attention.dense."),
            (re.compile(r"\.self_attn\."), ".attention."))


def published_name(name: str) -> str:
    for pattern, repl in _RENAMES:
        name = pattern.sub(repl, name)
    return name


def _plan(cfg: ModelConfig, spec: ArchSpec, plan: WeightPlan, names: frozenset[str]) -> WeightPlan:
    out: WeightPlan = {}
    for name, entry in aliased(cfg, spec, plan, names).items():
        published = published_name(name)
        out[published if not names or published in names else name] = entry
    return out


CHECKPOINT.add("ling", CheckpointKind(_plan, converted))

__all__ = ["published_name"]
from . import mtp  # noqa: E402,F401  (registers the MTP layout "ling")
