"""EXAONE-MoE's tiny model: what `moelink make-tiny-model --arch exaone_moe` and the tests build, with
transformers' own classes (ExaoneMoeConfig, ExaoneMoeForCausalLM).

At these sizes every boundary the engine cuts at is crossed by 1-150-token prompts: a 6-token window on the sliding
layers (the pattern "LLLG" of the published model: layers 0-2 and 4 sliding with rotary, 3 full and without it), a
dense first layer, 8 experts in 2 groups (1 chosen, top-2) with a correction bias, one shared expert, GQA 4 / 2 with
per-head q/k norms, routed_scaling_factor 2.5 (K-EXAONE's). Constants transformers initialises (norm weights, the
correction bias) are drawn, so a weight loaded into the wrong place shows.
"""
from __future__ import annotations

import torch

ARCH = "ExaoneMoeForCausalLM"
WINDOW = 6
FIELDS = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, num_shared_experts=1, n_group=2,
    topk_group=1, routed_scaling_factor=2.5, sliding_window=WINDOW, sliding_window_pattern=4, first_k_dense_replace=1,
    rms_norm_eps=1e-6, initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def tiny_config(vocab_size: int, max_position_embeddings: int, **overrides):
    """The tiny ExaoneMoeConfig, `overrides` on top (any of its fields)."""
    from transformers import ExaoneMoeConfig

    cfg = ExaoneMoeConfig(vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                          **{**FIELDS, **overrides})
    cfg.architectures = [ARCH]
    return cfg


def tiny_model(cfg, seed: int = 0):
    """transformers' model of `cfg` in float64, norm weights and correction biases drawn (the biases in float32,
    as moelink and every serving engine hold them: transformers adds its model-dtype copy to float32 scores)."""
    from transformers import ExaoneMoeForCausalLM

    torch.manual_seed(seed)
    model = ExaoneMoeForCausalLM(cfg).to(torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
        for mod in model.modules():
            bias = getattr(mod, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_((torch.randn(bias.shape, generator=g) * 0.05).to(bias.dtype))
    return model


__all__ = ["ARCH", "FIELDS", "WINDOW", "tiny_config", "tiny_model"]
