"""Tiny DeepSeek-V3 / V2, GLM-4-MoE, Qwen3-Next, Qwen3.5-MoE, DeepSeek-V3.2 and GLM-5 checkpoints built and saved by
transformers itself: the builders live in the package (engine/tools/tiny_families.py; the presets in their families'
engine/models/<family>/tiny.py, what `moelink make-tiny-model` writes); this module names them for the tests.

Each is transformers' own model class on a tiny config (hidden 32-48, 2-5 layers), randomly initialised with a fixed
seed, made float64 and written by `save_pretrained`, with the tiny tokenizer beside it. Together the HF_TINY configs
cover what issue 13 asks of each architecture (their comments in engine/models/deepseek/tiny.py).
"""
from __future__ import annotations

from pathlib import Path

import torch

from moelink.engine.models.deepseek.tiny import HF_DSA, HF_DSA_FP8, HF_TINY
from moelink.engine.models.qwen3_next.tiny import HF_HYBRID
from moelink.engine.tools.tiny_families import MAX_POS, VOCAB, Preset, preset_config, save_preset  # noqa: F401


def _preset(name: str) -> Preset:
    """The preset `name` of HF_TINY, HF_HYBRID, HF_DSA or HF_DSA_FP8 (looked up when called: a test may add one)."""
    return {**HF_TINY, **HF_HYBRID, **HF_DSA, **HF_DSA_FP8}[name]


def hf_config(name: str, **overrides):
    """transformers' config of preset `name`, `overrides` on top (a multimodal one's go into its text_config)."""
    return preset_config(_preset(name), **overrides)


def save_hf_checkpoint(out: Path, name: str, seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> str:
    """Build preset `name` with transformers, randomise what it initialises to constants, save it + tokenizer."""
    return save_preset(out, _preset(name), seed, dtype=dtype, **overrides)
