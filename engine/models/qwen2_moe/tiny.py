"""Qwen2-MoE's tiny checkpoint: `moelink make-tiny-model --arch qwen2_moe` and the test suite's
(tests/engine/test_qwen2_moe.py). Built by transformers' own Qwen2MoeForCausalLM and drawn by
engine/tools/tiny_families.save_drawn_preset (norm weights and the q/k/v biases random, so a weight loaded into the
wrong place shows).

What the family adds at these sizes: q/k/v biases, a dense layer among the routed ones (mlp_only_layers), a shared
MLP wider than the experts behind its sigmoid gate, and top-2 of 6 experts not renormalised (norm_topk_prob False,
the published configs' value).
"""
from __future__ import annotations

from ...tools.tiny_families import QUANT_FORMATS, Preset, TinyArch, preset_writer

QWEN2_MOE: Preset = ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
    hidden_size=64, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=6, num_experts_per_tok=2,
    mlp_only_layers=[1], norm_topk_prob=False, qkv_bias=True, rms_norm_eps=1e-6, bos_token_id=None,
    eos_token_id=None, pad_token_id=None))

ARCHS = {
    "qwen2_moe": TinyArch("Qwen2MoeForCausalLM", "Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B", ("float",) + QUANT_FORMATS,
                          write=preset_writer(QWEN2_MOE, drawn=True)),
}

__all__ = ["ARCHS", "QWEN2_MOE"]
