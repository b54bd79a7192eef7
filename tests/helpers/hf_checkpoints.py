"""Tiny DeepSeek-V3 / DeepSeek-V2 / GLM-4-MoE checkpoints built and saved by transformers itself.

Each is transformers' own model class on a tiny config (hidden 32-48, 2-3 layers), randomly initialised with
a fixed seed, made float64 and written by `save_pretrained`, with the tiny tokenizer beside it: nothing in
these files is written by moelink. Biases, norm weights and DeepSeek's e_score_correction_bias get random
values too (transformers initialises them to zeros / ones), so a weight loaded into the wrong place shows.

Together the configs cover what issue 13 asks of each architecture: n_group > 1 with topk_group < n_group,
first_k_dense_replace >= 1, n_shared_experts >= 1, q LoRA on and off, YaRN rope (with mscale != mscale_all_dim,
so both the cos/sin attention factor and the softmax scale differ from 1), interleaved and plain rope, GLM's
partial rotary with qkv bias and q/k norm, and routed-expert counts that are not powers of two.
"""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB, MAX_POS = 400, 512
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
         "beta_fast": 32, "beta_slow": 1}
_MLA_SMALL = dict(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10)

# name -> (transformers model_type, config fields beyond the common ones)
HF_TINY: dict[str, tuple[str, dict]] = {
    # DeepSeek-V3 layout: q LoRA, interleaved rope, 12 experts in 4 groups (2 chosen), one dense layer.
    "dsv3_lora": ("deepseek_v3", dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=24,
        **_MLA_SMALL, moe_intermediate_size=16, n_routed_experts=12, n_group=4, topk_group=2,
        num_experts_per_tok=3, first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5)),
    # No q LoRA, YaRN (DeepSeek-V3's rope: factor, mscale, interleaved), biases, 6 experts in 3 groups, 2 shared.
    "dsv3_yarn": ("deepseek_v3", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, q_lora_rank=None,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, moe_intermediate_size=16,
        n_routed_experts=6, n_group=3, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
        n_shared_experts=2, norm_topk_prob=False, attention_bias=True,
        rope_parameters=dict(_YARN, mscale=1.0, mscale_all_dim=0.8))),
    # Plain (non-interleaved) rope, no dense layer, 10 experts in one group, tied embeddings.
    "dsv3_neox": ("deepseek_v3", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, q_lora_rank=16,
        kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6, moe_intermediate_size=12,
        n_routed_experts=10, n_group=1, topk_group=1, num_experts_per_tok=3, first_k_dense_replace=0,
        n_shared_experts=1, rope_interleave=False, tie_word_embeddings=True)),
    # DeepSeek-V2-Lite layout: no q LoRA, softmax group-limited greedy (9 experts in 3 groups, 1 chosen),
    # V2-Lite's YaRN (mscale = mscale_all_dim = 0.707), 2 shared experts, one dense layer.
    "dsv2_lite": ("deepseek_v2", dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=None,
        **_MLA_SMALL, moe_intermediate_size=16, n_routed_experts=9, topk_method="group_limited_greedy", n_group=3,
        topk_group=1, num_experts_per_tok=3, first_k_dense_replace=1, n_shared_experts=2,
        routed_scaling_factor=16.0, rope_parameters=dict(_YARN, mscale=0.707, mscale_all_dim=0.707))),
    # DeepSeek-V2 layout: q LoRA, plain greedy top-k over 6 experts, no dense layer, one shared expert.
    "dsv2_lora": ("deepseek_v2", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, moe_intermediate_size=16,
        n_routed_experts=6, topk_method="greedy", num_experts_per_tok=2, first_k_dense_replace=0,
        n_shared_experts=1)),
    # GLM-4.5 layout: partial rotary (half of each head), q/k norm, qkv bias, 10 experts in 2 groups (1
    # chosen), one dense layer, one shared expert.
    "glm_bias": ("glm4_moe", dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, moe_intermediate_size=16, n_routed_experts=10, n_group=2, topk_group=1, num_experts_per_tok=3,
        first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5, use_qk_norm=True,
        attention_bias=True)),
    # A quarter of each head rotated, with YaRN; no q/k norm, no bias, 6 experts, two shared experts.
    "glm_yarn": ("glm4_moe", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, moe_intermediate_size=16, n_routed_experts=6, n_group=1, topk_group=1, num_experts_per_tok=2,
        first_k_dense_replace=1, n_shared_experts=2, norm_topk_prob=False,
        rope_parameters=dict(_YARN, partial_rotary_factor=0.25))),
}

# Hybrid models (linear attention beside full attention): kept apart from HF_TINY, whose parity tests assume every
# full block of a prompt can hit the prefix cache (a hybrid model's hits stop at its state checkpoints).
HF_HYBRID: dict[str, tuple[str, dict]] = {
    # Qwen3-Next layout: gated DeltaNet on 3 layers of 4 (2 q/k heads, 4 value heads), gated full attention with a
    # quarter of each head rotated, a shared expert behind its sigmoid gate, one dense layer (mlp_only_layers).
    "qwen3_next": ("qwen3_next", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=12, linear_conv_kernel_dim=4, num_experts=6, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=24, mlp_only_layers=[4],
        layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention",
                     "full_attention"])),
    # Qwen3.5-MoE as published: a multimodal checkpoint (Qwen3_5MoeForConditionalGeneration: the text model under
    # model.language_model., a vision tower beside it) whose text model has split linear-attention projections.
    "qwen3_5_moe": ("qwen3_5_moe", dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_conv_kernel_dim=4, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24)),
}

# DeepSeek Sparse Attention (issue 43): MLA with a lightning indexer, index_topk small so prompts of 1..150 tokens go
# sparse. 16 index heads keep exact ties of the index scores (a key whose every head's ReLU is 0) out of the top-k
# boundary, where transformers' torch.topk and moelink's selection may break them differently. Kept apart from
# HF_TINY: their parity oracle is transformers' forward without a cache (hf_greedy_nocache), not generate.
HF_DSA: dict[str, tuple[str, dict]] = {
    # DeepSeek-V3.2 layout: half-split indexer rope, 12 experts in 4 groups, one dense layer, top-8.
    "dsv32": ("deepseek_v32", dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=24,
        **_MLA_SMALL, moe_intermediate_size=16, n_routed_experts=12, n_group=4, topk_group=2,
        num_experts_per_tok=3, first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5,
        index_topk=8, index_n_heads=16, index_head_dim=16)),
    # GLM-5 layout: interleaved indexer rope, layer 1 shares layer 0's selection ("FSF"), YaRN, MLA biases,
    # 10 experts in one group, top-12.
    "glm5": ("glm_moe_dsa", dict(
        hidden_size=48, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=16,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, moe_intermediate_size=16,
        n_routed_experts=10, n_group=1, topk_group=1, num_experts_per_tok=3, first_k_dense_replace=1,
        n_shared_experts=1, attention_bias=True, index_topk=12, index_n_heads=16, index_head_dim=12,
        indexer_types=["full", "shared", "full"], rope_parameters=dict(_YARN, mscale=1.0, mscale_all_dim=0.8))),
}

# DeepSeek-V3.2 for FP8 blocks of 16 x 16: every head's q rows (8 nope + 8 rope) and kv_a's rope rows inside one block
# (the rope de-interleave may reorder rows only within a block), the indexer's 16 heads of 16.
HF_DSA_FP8: dict[str, tuple[str, dict]] = {
    "dsv32_fp8": ("deepseek_v32", dict(
        hidden_size=48, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32,
        kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, moe_intermediate_size=16,
        n_routed_experts=6, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_shared_experts=1, index_topk=8, index_n_heads=16, index_head_dim=16)),
}

_CLASSES = {
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM"),
    "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM"),
    "glm_moe_dsa": ("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM"),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM"),
    "qwen3_5_moe": ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration"),
}
# A multimodal config's vision tower, as small as its config class allows (never run by moelink).
_TINY_VISION = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16, out_hidden_size=32, patch_size=4,
                    temporal_patch_size=2, spatial_merge_size=2)


def hf_config(name: str):
    import transformers

    model_type, fields = {**HF_TINY, **HF_HYBRID, **HF_DSA, **HF_DSA_FP8}[name]
    config_cls, model_cls = _CLASSES[model_type]
    common = dict(vocab_size=VOCAB, max_position_embeddings=MAX_POS, initializer_range=0.1)
    if model_cls.endswith("ForConditionalGeneration"):  # multimodal: the text model's fields in text_config
        cfg = getattr(transformers, config_cls)(text_config={**common, **fields}, vision_config=_TINY_VISION)
    else:
        cfg = getattr(transformers, config_cls)(**common, **fields)
    cfg.architectures = [model_cls]
    return cfg


def save_hf_checkpoint(out: Path, name: str, seed: int = 0) -> str:
    """Build HF_TINY[name] with transformers, randomise what it initialises to constants, save it + tokenizer."""
    import transformers

    from moelink.engine.tools.tiny_corpus import train_tiny_tokenizer, write_tokenizer_configs

    cfg = hf_config(name)
    torch.manual_seed(seed)
    model = getattr(transformers, cfg.architectures[0])(cfg).to(torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod_name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g, dtype=torch.float64) * 0.1)
            if type(mod).__name__.endswith(("RMSNorm", "RMSNormGated")):
                mod.weight.add_(torch.randn(mod.weight.shape, generator=g, dtype=torch.float64) * 0.1)
            if isinstance(mod, torch.nn.LayerNorm) and ".indexer." in mod_name:  # DSA's k_norm: weight and bias
                mod.weight.add_(torch.randn(mod.weight.shape, generator=g, dtype=torch.float64) * 0.1)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g, dtype=torch.float64) * 0.1)
            bias = getattr(mod, "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_(torch.randn(bias.shape, generator=g, dtype=bias.dtype) * 0.05)
    out = Path(out)
    model.save_pretrained(out)
    tok = train_tiny_tokenizer(VOCAB)
    tok.save(str(out / "tokenizer.json"))
    write_tokenizer_configs(out, tok, MAX_POS)
    return str(out)
