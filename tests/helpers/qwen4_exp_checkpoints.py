"""Tiny Qwen3.8-Flash-Next checkpoints built and saved by transformers itself (the family's tiny model:
engine/models/qwen4_exp/tiny.py), with the tiny tokenizer beside them."""
from __future__ import annotations

from moelink.engine.models.qwen4_exp.tiny import EOS, PRESET, save_tiny
from moelink.engine.tools.tiny_families import VOCAB, preset_config


def qwen4_exp_config(**overrides):
    """The tiny multimodal config (`overrides`: text_config fields)."""
    return preset_config(PRESET, **overrides)


def save_qwen4_exp_checkpoint(out, seed: int = 0, **overrides) -> str:
    return save_tiny(out, seed, **overrides)


__all__ = ["EOS", "VOCAB", "qwen4_exp_config", "save_qwen4_exp_checkpoint"]
