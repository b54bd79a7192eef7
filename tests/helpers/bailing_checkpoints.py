"""Tiny Ling hybrid checkpoints built and saved by transformers itself (the family's preset:
engine/models/bailing_hybrid/tiny.py, drawn by engine/tools/tiny_families.save_drawn_preset)."""
from __future__ import annotations

from moelink.engine.models.bailing_hybrid.tiny import BAILING
from moelink.engine.tools.tiny_families import VOCAB, preset_config, save_drawn_preset


def bailing_config(**overrides):
    return preset_config(BAILING, **overrides)


def save_bailing_checkpoint(out, seed: int = 0, **overrides) -> str:
    return save_drawn_preset(out, BAILING, seed, **overrides)


__all__ = ["VOCAB", "bailing_config", "save_bailing_checkpoint"]
