"""FlexOlmo's tiny checkpoint: `moelink make-tiny-model --arch flex_olmo` and the test suite's
(tests/engine/test_flex_olmo.py). Built by transformers' own FlexOlmoForCausalLM and drawn by
engine/tools/tiny_families.save_drawn_preset (the norm weights random, so a norm before a block rather than after,
or one loaded into the wrong place, shows).

What the family adds at these sizes: the q/k norms over all heads with GQA 4 / 2 (k's weight K * head_dim wide), the
norms after each block, top-2 of 7 experts (FlexOlmo-7x7B's count) not renormalised, every layer routed.
"""
from __future__ import annotations

from ...tools.tiny_families import Preset, TinyArch, preset_writer

FLEX_OLMO: Preset = ("FlexOlmoConfig", "FlexOlmoForCausalLM", dict(
    hidden_size=64, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    num_experts=7, num_experts_per_tok=2, norm_topk_prob=False, rms_norm_eps=1e-6, bos_token_id=None,
    eos_token_id=None, pad_token_id=None))

ARCHS = {
    "flex_olmo": TinyArch("FlexOlmoForCausalLM", "FlexOlmo-7x7B-1T (-RT)", ("float",),
                          write=preset_writer(FLEX_OLMO, drawn=True), expert_width="intermediate_size"),
}

__all__ = ["ARCHS", "FLEX_OLMO"]
