"""Mellum's tiny checkpoint: `moelink make-tiny-model --arch mellum` and the test suite's (tests/engine/test_mellum.py).
Built by transformers' own MellumForCausalLM and drawn by engine/tools/tiny_families.save_drawn_preset (the norm
weights random, so a norm loaded into the wrong place shows).

What the family adds at these sizes: sliding (window 6) and full layers alternating, each type its own rope (the full
layers' theta 500000, the sliding ones' 10000), a dense first layer by
mlp_layer_types, softmax top-2 of 8 renormalised.
"""
from __future__ import annotations

from ...tools.tiny_families import WINDOW, Preset, TinyArch, preset_writer

MELLUM: Preset = ("MellumConfig", "MellumForCausalLM", dict(
    hidden_size=64, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
    sliding_window=WINDOW,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 500000.0},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, pad_token_id=None))

ARCHS = {
    "mellum": TinyArch("MellumForCausalLM", "Mellum (MoE)", ("float",), write=preset_writer(MELLUM, drawn=True)),
}

__all__ = ["ARCHS", "MELLUM"]
