"""Tiny Kimi Linear checkpoints built and saved by transformers itself (the family's preset:
engine/models/kimi_linear/tiny.py, drawn by engine/tools/tiny_families.save_drawn_preset)."""
from __future__ import annotations

from moelink.engine.models.kimi_linear.tiny import KIMI_LINEAR
from moelink.engine.tools.tiny_families import VOCAB, preset_config, save_drawn_preset


def kimi_linear_config(**overrides):
    return preset_config(KIMI_LINEAR, **overrides)


def save_kimi_linear_checkpoint(out, seed: int = 0, **overrides) -> str:
    return save_drawn_preset(out, KIMI_LINEAR, seed, **overrides)


__all__ = ["VOCAB", "kimi_linear_config", "save_kimi_linear_checkpoint"]
