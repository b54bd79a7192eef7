"""EXAONE-MoE's tiny checkpoint: `moelink make-tiny-model --arch exaone_moe` and the test suite's
(tests/helpers/drawn_presets.py). Built by transformers' own ExaoneMoeForCausalLM and drawn by
engine/tools/tiny_families.save_drawn_preset (norm weights and the correction bias random, so a weight loaded into the
wrong place shows).

At these sizes every boundary the engine cuts at is crossed by 1-150-token prompts: a 6-token window on the sliding
layers (the published model's pattern "LLLG": layers 0-2 and 4 sliding with rotary, 3 full and without it), a dense
first layer, 8 experts in 2 groups (1 chosen, top-2) with a correction bias, one shared expert, GQA 4 / 2 with
per-head q/k norms, routed_scaling_factor 2.5 (K-EXAONE's).
"""
from __future__ import annotations

from ...tools.tiny_families import QUANT_FORMATS, Preset, TinyArch, preset_writer, published_as

WINDOW = 6
EXAONE: Preset = ("ExaoneMoeConfig", "ExaoneMoeForCausalLM", dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, num_shared_experts=1, n_group=2,
    topk_group=1, routed_scaling_factor=2.5, sliding_window=WINDOW, sliding_window_pattern=4, first_k_dense_replace=1,
    rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, pad_token_id=None))

ARCHS = {
    "exaone_moe": TinyArch("ExaoneMoeForCausalLM", "K-EXAONE (236B-A23B)", ("float",) + QUANT_FORMATS,
                           write=preset_writer(EXAONE, drawn=True)),
    # The same checkpoint under vLLM's spelling of the architecture.
    "exaone_moe_vllm": TinyArch("ExaoneMoEForCausalLM", "K-EXAONE as vLLM names it", ("float", "fp8"),
                                write=published_as(preset_writer(EXAONE, drawn=True), "ExaoneMoEForCausalLM")),
}

__all__ = ["ARCHS", "EXAONE", "WINDOW"]
