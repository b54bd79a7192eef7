"""ERNIE-4.5-MoE's tiny checkpoint: `moelink make-tiny-model --arch ernie4_5_moe` and the test suite's
(tests/engine/test_ernie4_5_moe.py). Built by transformers' own Ernie4_5_MoeForCausalLM and drawn by
engine/tools/tiny_families.save_drawn_preset (norm weights and the correction bias random, so a weight loaded into
the wrong place shows).

What the family adds at these sizes: an interleaved rope on GQA 4 / 2 (q/k rows de-interleaved at load), a dense
first and last layer (moe_layer_start_index 1, moe_layer_end_index 2 of 4), softmax top-2 of 6 experts selected with
a correction bias, two shared experts.
"""
from __future__ import annotations

from ...tools.tiny_families import QUANT_FORMATS, Preset, TinyArch, preset_writer

ERNIE: Preset = ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", dict(
    hidden_size=64, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    moe_intermediate_size=16, moe_num_experts=6, moe_k=2, moe_num_shared_experts=2, moe_layer_start_index=1,
    moe_layer_end_index=2, moe_layer_interval=1, tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=None,
    eos_token_id=None, pad_token_id=None))

ARCHS = {
    "ernie4_5_moe": TinyArch("Ernie4_5_MoeForCausalLM", "ERNIE-4.5-21B-A3B, ERNIE-4.5-300B-A47B",
                             ("float",) + QUANT_FORMATS,
                             write=preset_writer(ERNIE, drawn=True)),
}

__all__ = ["ARCHS", "ERNIE"]
