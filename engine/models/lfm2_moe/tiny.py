"""LFM2-MoE's tiny checkpoint: `moelink make-tiny-model --arch lfm2_moe` and the test suite's
(tests/engine/test_lfm2_moe.py). Built by transformers' own Lfm2MoeForCausalLM and drawn by
engine/tools/tiny_families.save_drawn_preset (norm weights, the short convs' biases and the expert bias random).

What the family adds at these sizes: short-conv layers (3 taps, with biases: conv_bias) around two GQA layers with
q/k norms, a dense first layer (num_dense_layers 1), then top-2 of 6 sigmoid-routed experts selected with the expert
bias, renormalised and scaled by routed_scaling_factor 1.5; tied embeddings, as published.
"""
from __future__ import annotations

from ...tools.tiny_families import Preset, TinyArch, preset_writer

LFM2_MOE: Preset = ("Lfm2MoeConfig", "Lfm2MoeForCausalLM", dict(
    hidden_size=64, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=5, num_attention_heads=4,
    num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, num_dense_layers=1, conv_bias=True, conv_L_cache=3,
    layer_types=["conv", "full_attention", "conv", "conv", "full_attention"], use_expert_bias=True,
    norm_topk_prob=True, routed_scaling_factor=1.5, tie_word_embeddings=True, norm_eps=1e-5,
    bos_token_id=None, eos_token_id=None, pad_token_id=None))

ARCHS = {
    "lfm2_moe": TinyArch("Lfm2MoeForCausalLM", "LiquidAI LFM2-8B-A1B (short conv + GQA + MoE)", ("float",),
                         write=preset_writer(LFM2_MOE, drawn=True), expert_width="moe_intermediate_size"),
}

__all__ = ["ARCHS", "LFM2_MOE"]
