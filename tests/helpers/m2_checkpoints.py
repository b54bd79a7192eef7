"""Tiny MiniMax-M2 and MiMo-V2-Flash checkpoints built and saved by transformers itself (its own model classes,
`save_pretrained`), with the tiny tokenizer beside them: the presets live in the package
(engine/models/minimax_m2/tiny.py and mimo_v2_flash/tiny.py, drawn by engine/tools/tiny_families.save_drawn_preset,
what `moelink make-tiny-model --arch minimax_m2 / mimo_v2_flash` writes). What each exercises: the presets' comments there. Every parameter transformers
initialises to a constant gets random values (norm weights, biases, sinks, the correction bias), so a weight loaded
into the wrong place shows.
"""
from __future__ import annotations

from pathlib import Path

import torch

from moelink.engine.models.mimo_v2_flash.tiny import MIMO
from moelink.engine.models.minimax_m2.tiny import MINIMAX
from moelink.engine.tools.tiny_families import MAX_POS, VOCAB, WINDOW, preset_config, save_drawn_preset  # noqa: F401

# name -> (config class, model class, fields)
M2_TINY = {"minimax": MINIMAX, "mimo": MIMO}


def m2_config(name: str, **overrides):
    return preset_config(M2_TINY[name], **overrides)


def save_m2_checkpoint(out: Path, name: str, seed: int = 0, dtype: torch.dtype = torch.float64, fused: bool = False,
                       **overrides) -> str:
    """M2_TINY[name] built by transformers, what it initialises to constants drawn, saved + the tokenizer (`fused`:
    in transformers 5's own names; engine/tools/tiny_families.save_drawn_preset)."""
    return save_drawn_preset(out, M2_TINY[name], seed, dtype, fused, **overrides)
