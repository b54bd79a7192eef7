"""Tiny EXAONE-MoE checkpoints built and saved by transformers itself (the family's tiny model:
engine/models/exaone_moe/tiny.py), with the tiny tokenizer beside them."""
from __future__ import annotations

import torch

from moelink.engine.models.exaone_moe.tiny import tiny_config, tiny_model
from moelink.engine.tools.tiny_families import MAX_POS, VOCAB, save_model


def exaone_config(**overrides):
    return tiny_config(VOCAB, MAX_POS, **overrides)


def save_exaone_checkpoint(out, fused: bool = False, seed: int = 0, **overrides) -> str:
    """The tiny model (`overrides`: config fields) saved in float64 by save_pretrained; `fused`: in transformers 5's
    own names (save_original_format=False)."""
    cfg = exaone_config(**overrides)
    return save_model(tiny_model(cfg, seed), out, cfg, torch.float64, fused)


__all__ = ["VOCAB", "exaone_config", "save_exaone_checkpoint"]
