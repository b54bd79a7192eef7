"""Tiny LongCat-Flash checkpoints built and saved by transformers itself (the family's tiny model:
engine/models/longcat_flash/tiny.py), with the tiny tokenizer beside them."""
from __future__ import annotations

import torch

from moelink.engine.models.longcat_flash.tiny import tiny_config, tiny_model
from moelink.engine.tools.tiny_families import MAX_POS, VOCAB, save_model


def longcat_config(**overrides):
    return tiny_config(VOCAB, MAX_POS, **overrides)


def save_longcat_checkpoint(out, seed: int = 0, **overrides) -> str:
    """The tiny model (`overrides`: config fields) saved in float64 by save_pretrained."""
    cfg = longcat_config(**overrides)
    return save_model(tiny_model(cfg, seed), out, cfg, torch.float64)


__all__ = ["VOCAB", "longcat_config", "save_longcat_checkpoint"]
