"""Ling's hybrid tiny checkpoint: `moelink make-tiny-model --arch bailing_hybrid` and the test suite's
(tests/helpers/drawn_presets.py). Built by transformers' own BailingHybridForCausalLM and drawn by
engine/tools/tiny_families.save_drawn_preset (norm weights and the correction bias random).

Five layers, MLA (q LoRA 16, latent 16, interleaved rope, the per-head output gate) on 1 and 4, KDA (4 heads of 16,
full-rank gates, the safe forget gate) on the others; two dense layers; 8 experts in 2 groups (1 chosen, top-2) with
the correction bias and a shared expert.
"""
from __future__ import annotations

from ...tools.tiny_families import Preset, TinyArch, preset_writer

BAILING: Preset = ("BailingHybridConfig", "BailingHybridForCausalLM", dict(
    hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=5, num_attention_heads=4,
    q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, head_dim=16,
    num_local_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=2,
    short_conv_kernel_size=4, num_mtp_layers=0, rope_theta=10000.0, rms_norm_eps=1e-6, pad_token_id=None,
    eos_token_id=None,
    layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention", "full_attention"]))

# Float only for now: the KDA projections run float (gated DeltaNet's rule).
ARCHS = {
    "bailing_hybrid": TinyArch("BailingHybridForCausalLM", "Ling hybrid (bailing_hybrid)", ("float",),
                               write=preset_writer(BAILING, drawn=True)),
}

__all__ = ["ARCHS", "BAILING"]
