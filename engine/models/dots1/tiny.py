"""dots.llm1's tiny checkpoint: `moelink make-tiny-model --arch dots1` and the test suite's
(tests/engine/test_dots1.py). Built by transformers' own Dots1ForCausalLM and drawn by
engine/tools/tiny_families.save_drawn_preset (norm weights and the correction bias random, so a weight loaded into
the wrong place shows).

What the family adds at these sizes: Qwen3's per-head q/k norm with GQA 4 / 2, one leading dense layer, DeepSeek-V3's
routing (top-2 of 8 in 2 groups of which the best 1 is kept, renormalised, times routed_scaling_factor 2.5) beside
two shared experts, as dots.llm1 publishes them (first_k_dense_replace 1, n_shared_experts 2, scaling 2.5).
"""
from __future__ import annotations

from ...tools.tiny_families import QUANT_FORMATS, Preset, TinyArch, preset_writer

DOTS1: Preset = ("Dots1Config", "Dots1ForCausalLM", dict(
    hidden_size=64, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=2,
    first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5, rms_norm_eps=1e-6, bos_token_id=None,
    eos_token_id=None, pad_token_id=None))

ARCHS = {
    "dots1": TinyArch("Dots1ForCausalLM", "dots.llm1.base, dots.llm1.inst", ("float",) + QUANT_FORMATS,
                      write=preset_writer(DOTS1, drawn=True)),
}

__all__ = ["ARCHS", "DOTS1"]
