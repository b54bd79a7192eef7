"""Jamba's tiny checkpoint: `moelink make-tiny-model --arch jamba` and the test suite's (tests/engine/test_jamba.py).
Built by transformers' own JambaForCausalLM and drawn by engine/tools/tiny_families.save_drawn_preset (the norms,
Jamba's dt / B / C norms among them, the conv and dt_proj biases random).

What the family adds at these sizes: five layers, attention on layers 1 and 4 (attn_layer_period 3, offset 1: GQA 4 /
2 without rotary), Mamba1 on 0, 2, 3 (128 channels = 2 x hidden, d_state 16, 4 conv taps, dt rank 8), routed FFNs on
the odd layers (expert_layer_period 2, offset 1: top-2 of 6, softmax over all six, not renormalized) and dense MLPs
on the even ones: every pairing of mixer and FFN.
"""
from __future__ import annotations

from ...tools.tiny_families import Preset, TinyArch, preset_writer

JAMBA: Preset = ("JambaConfig", "JambaForCausalLM", dict(
    hidden_size=64, intermediate_size=32, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
    num_experts=6, num_experts_per_tok=2, attn_layer_period=3, attn_layer_offset=1, expert_layer_period=2,
    expert_layer_offset=1, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8, mamba_conv_bias=True,
    mamba_proj_bias=False, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None,
    eos_token_id=None, pad_token_id=None))

ARCHS = {
    "jamba": TinyArch("JambaForCausalLM", "Jamba v0.1, Jamba 1.5 Mini / Large, Jamba 1.7 (Mamba1 + GQA + MoE)",
                      ("float",), write=preset_writer(JAMBA, drawn=True), expert_width="intermediate_size"),
}

__all__ = ["ARCHS", "JAMBA"]
