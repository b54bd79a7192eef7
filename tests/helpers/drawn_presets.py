"""Tiny checkpoints of a family's preset (its engine/models/<family>/tiny.py), built and saved by transformers itself
with the constants it initialises drawn (engine/tools/tiny_families.save_drawn_preset), the tiny tokenizer beside
them: the families that need no builder of their own (EXAONE-MoE, Kimi Linear, Ling's hybrid, MiniMax-M2, ...)."""
from __future__ import annotations

from pathlib import Path

from moelink.engine.tools.tiny_families import VOCAB, Preset, preset_config, save_drawn_preset


def config_of(preset: Preset, **overrides):
    """The preset's transformers config, `overrides` (config fields) on top."""
    return preset_config(preset, **overrides)


def save_preset(out: Path | str, preset: Preset, seed: int = 0, fused: bool = False, **overrides) -> str:
    """The preset saved in float64 by save_pretrained; `fused`: in transformers 5's own names."""
    return save_drawn_preset(Path(out), preset, seed, fused=fused, **overrides)


__all__ = ["VOCAB", "config_of", "save_preset"]
