"""Kimi Linear's tiny checkpoint: `moelink make-tiny-model --arch kimi_linear` and the test suite's
(tests/helpers/drawn_presets.py). Built by transformers' own KimiLinearForCausalLM and drawn by
engine/tools/tiny_families.save_drawn_preset (norm weights and the correction bias random).

Five layers, KDA on 0, 2 and 3, MLA (q LoRA 16, latent 16, no rotary) on 1 and 4; KDA of 4 heads of 16 with a 4-wide convolution; a dense first layer; 8 experts
in 2 groups (1 chosen, top-2) with the correction bias and a shared expert.
"""
from __future__ import annotations

from ...tools.tiny_families import Preset, TinyArch, preset_writer

KIMI_LINEAR: Preset = ("KimiLinearConfig", "KimiLinearForCausalLM", dict(
    hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=5, num_attention_heads=4,
    q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_local_experts=8,
    num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.446,
    linear_head_dim=16, linear_num_heads=4, linear_conv_kernel_dim=4, rms_norm_eps=1e-6, bos_token_id=None,
    layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention", "full_attention"],
    eos_token_id=None, pad_token_id=None))

# Float only: Moonshot publishes Kimi Linear in bfloat16 alone (docs/models.md: Test models), so no FP8 format is
# offered.
ARCHS = {
    "kimi_linear": TinyArch("KimiLinearForCausalLM", "Kimi-Linear-48B-A3B (-Instruct)", ("float",),
                            write=preset_writer(KIMI_LINEAR, drawn=True)),
}

__all__ = ["ARCHS", "KIMI_LINEAR"]
