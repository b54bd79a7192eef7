"""Tiny EXAONE-MoE checkpoints built and saved by transformers itself (the family's preset:
engine/models/exaone_moe/tiny.py, drawn by engine/tools/tiny_families.save_drawn_preset), with the tiny tokenizer
beside them."""
from __future__ import annotations

from moelink.engine.models.exaone_moe.tiny import EXAONE
from moelink.engine.tools.tiny_families import VOCAB, preset_config, save_drawn_preset


def exaone_config(**overrides):
    return preset_config(EXAONE, **overrides)


def save_exaone_checkpoint(out, fused: bool = False, seed: int = 0, **overrides) -> str:
    """The tiny model (`overrides`: config fields) saved in float64 by save_pretrained; `fused`: in transformers 5's
    own names (save_original_format=False)."""
    return save_drawn_preset(out, EXAONE, seed, fused=fused, **overrides)


__all__ = ["VOCAB", "exaone_config", "save_exaone_checkpoint"]
