"""Nemotron-H's tiny checkpoints: `moelink make-tiny-model --arch nemotron_h` and the test suite's
(tests/engine/test_nemotron_h.py). Built by transformers' own NemotronHForCausalLM and drawn by
engine/tools/tiny_families.save_drawn_preset (norm weights and the router's correction bias random).

At these sizes: every block kind, M E * - M M E (paired into engine layers ME, *-, M, ME: a Mamba2 layer followed
by a mixer, an attention layer followed by the relu^2 MLP), Mamba2 of 4 heads of 32 in 2 groups, d_state 16, 4 conv
taps; GQA 4 / 2 without rotary; 8 relu^2 experts in 2 groups (top-1 group, top-2 experts, sigmoid with the
correction bias, scaled by 2.5) through a 32-wide latent (Nemotron 3 Super's latent MoE; NEMOTRON_H_NANO has none),
the shared expert 24 wide. Published checkpoints untie the LM head."""
from __future__ import annotations

from ...tools.tiny_families import Preset, TinyArch, preset_writer

_FIELDS = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               layers_block_type=["linear_attention", "moe", "full_attention", "mlp", "linear_attention",
                                  "linear_attention", "moe"],
               intermediate_size=32, mamba_num_heads=4, mamba_head_dim=32, n_groups=2, ssm_state_size=16,
               conv_kernel=4, expand=2, chunk_size=16, n_routed_experts=8, num_experts_per_tok=2,
               moe_intermediate_size=16, moe_shared_expert_intermediate_size=24, n_group=2, topk_group=1,
               routed_scaling_factor=2.5, norm_topk_prob=True, tie_word_embeddings=False,
               bos_token_id=None, eos_token_id=None, pad_token_id=None)
NEMOTRON_H: Preset = ("NemotronHConfig", "NemotronHForCausalLM", dict(_FIELDS, moe_latent_size=32))
NEMOTRON_H_NANO: Preset = ("NemotronHConfig", "NemotronHForCausalLM", dict(_FIELDS))

ARCHS = {
    "nemotron_h": TinyArch("NemotronHForCausalLM", "NVIDIA Nemotron 3 Nano / Super (Mamba2 + GQA + relu^2 MoE)",
                           ("float",), write=preset_writer(NEMOTRON_H, drawn=True)),
}

__all__ = ["ARCHS", "NEMOTRON_H", "NEMOTRON_H_NANO"]
