"""LongCat-Flash's tiny model: what the tests build (and `moelink make-tiny-model --arch longcat_flash`), with
transformers' own classes (LongcatFlashConfig, LongcatFlashForCausalLM).

Two layers (four sublayers: four MLA caches), MLA with q LoRA 16 and a latent of 16 (so the LoRA scales are 1.41,
not 1), interleaved rope; 6 routed experts and 2 zero-computation ones, top-3 (so many tokens pick an identity
expert), routed_scaling_factor 6 (the published model's); dense MLPs of 48. Constants transformers initialises (norm
weights, the correction bias) are drawn, so a weight loaded into the wrong place shows.
"""
from __future__ import annotations

import torch

ARCH = "LongcatFlashForCausalLM"
FIELDS = dict(
    hidden_size=32, ffn_hidden_size=48, num_layers=2, num_attention_heads=4, q_lora_rank=16, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=8, head_dim=8, v_head_dim=8, moe_topk=3, n_routed_experts=6, zero_expert_num=2,
    expert_ffn_hidden_size=16, routed_scaling_factor=6.0, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
    rms_norm_eps=1e-6, initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def tiny_config(vocab_size: int, max_position_embeddings: int, **overrides):
    """The tiny LongcatFlashConfig, `overrides` on top (any of its fields)."""
    from transformers import LongcatFlashConfig

    cfg = LongcatFlashConfig(vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                             **{**FIELDS, **overrides})
    cfg.architectures = [ARCH]
    return cfg


def tiny_model(cfg, seed: int = 0):
    """transformers' model of `cfg` in float64, norm weights and correction biases drawn (the biases in float32, as
    moelink holds them: transformers adds its copy to float32 softmax scores)."""
    from transformers import LongcatFlashForCausalLM

    torch.manual_seed(seed)
    model = LongcatFlashForCausalLM(cfg).to(torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
        for mod in model.modules():
            bias = getattr(mod, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_((torch.randn(bias.shape, generator=g) * 0.05).to(bias.dtype))
    return model


__all__ = ["ARCH", "FIELDS", "tiny_config", "tiny_model"]
