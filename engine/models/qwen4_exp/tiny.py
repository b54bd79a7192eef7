"""Qwen3.8-Flash-Next's tiny checkpoint: `moelink make-tiny-model --arch qwen4_exp` and the test suite's
(tests/helpers/qwen4_exp_checkpoints.py), built by transformers' own classes (Qwen4ExpConfig,
Qwen4ExpForConditionalGeneration: the text model under model.language_model., a tiny vision tower beside it, as
published).

Five layers: gated DeltaNet on 0, 1, 3 (PLE tables before 0 and 3, each in 2 checkpoint shards), QSA on 2 and 4
("full_attention" as the published config names them: transformers reads them as indexed_attention) with blocks
of 4 tokens and a budget of 8 (2 blocks), so 1-150-token prompts cross many blocks; 3 residual streams; 6 experts,
top-2, a shared expert. What transformers initialises to constants is drawn (norm weights; the PLE convolution,
which transformers zeroes), so a weight loaded into the wrong place shows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ...tools.tiny_families import TinyArch, build_hf_model, preset_config, save_model

_TINY_VISION = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16, out_hidden_size=32, patch_size=4,
                    temporal_patch_size=2, spatial_merge_size=2)
EOS = 2
PRESET = ("Qwen4ExpConfig", "Qwen4ExpForConditionalGeneration", dict(
    hidden_size=32, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
    linear_conv_kernel_dim=4, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
    layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention", "full_attention"],
    hc_count=3, hc_lowrank=8, ple_layer_ids=[1, 4], ple_embed_dim=16, ple_conv_kernel_size=4, ngram_size=3,
    heads_per_ngram=2, ngram_vocab_size_base=61, make_ngram_vocab_size_divisible_by=8, split_ngram_parts=2,
    indexer_n_heads=8, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8, indexer_compress_ratio=4,
    eos_token_id=EOS, vision_config=_TINY_VISION))


def tiny_model(cfg, seed: int = 0):
    """transformers' model of `cfg` in float64, its constants drawn, the PLE convolutions too."""
    model = build_hf_model(cfg, seed)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ple.conv1d." in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


def save_tiny(out: Path, seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> str:
    cfg = preset_config(PRESET, **overrides)
    return save_model(tiny_model(cfg, seed), out, cfg, dtype)


def _write(out: Path, *, seed: int, dtype: torch.dtype, fmt: str, overrides: Mapping) -> object:
    return save_tiny(out, seed, dtype, **overrides)


ARCHS = {
    "qwen4_exp": TinyArch("Qwen4ExpForConditionalGeneration", "Qwen3.8-Flash-Next as published (the text model of a "
                          "multimodal checkpoint)", ("float", "fp8"), write=_write),
}

__all__ = ["ARCHS", "EOS", "PRESET", "save_tiny", "tiny_model"]
