"""OLMoE's tiny checkpoint: `moelink make-tiny-model --arch olmoe` and the test suite's (tests/engine/test_olmoe.py).
Built by transformers' own OlmoeForCausalLM and drawn by engine/tools/tiny_families.save_drawn_preset (the q/k norm
weights random, so a per-head norm, or a norm loaded into the wrong place, shows).

What the family adds at these sizes: q/k RMSNorm over all heads at once with GQA 4 / 2 (k's norm is K * head_dim
wide), a clip_qkv the projections cross (1.0: about a third of q, k and v is clamped), top-2
of 8 experts not renormalised (norm_topk_prob False, the published config's value), every layer routed.
"""
from __future__ import annotations

from ...tools.tiny_families import QUANT_FORMATS, Preset, TinyArch, preset_writer

OLMOE: Preset = ("OlmoeConfig", "OlmoeForCausalLM", dict(
    hidden_size=64, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, clip_qkv=1.0, rms_norm_eps=1e-5,
    bos_token_id=None, eos_token_id=None, pad_token_id=None))

ARCHS = {
    "olmoe": TinyArch("OlmoeForCausalLM", "OLMoE-1B-7B (-Instruct)", ("float",) + QUANT_FORMATS,
                      write=preset_writer(OLMOE, drawn=True),
                      expert_width="intermediate_size"),
}

__all__ = ["ARCHS", "OLMOE"]
