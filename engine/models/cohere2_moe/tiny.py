"""Cohere2-MoE's tiny checkpoint: `moelink make-tiny-model --arch cohere2_moe` and the test suite's
(tests/engine/test_cohere2_moe.py). Built by transformers' own Cohere2MoeForCausalLM and drawn by
engine/tools/tiny_families.save_drawn_preset (norm weights and the attention biases random).

What the family adds at these sizes: the parallel layer behind one LayerNorm (rms_norm_eps null, as Cohere's
configs), sliding-window layers of 12 keys rotating with the interleaved rope between global NoPE layers, a dense
prefix layer (which rotates: force_rope), top-2 of 6 experts (softmax over the two logits) averaged with one shared
MLP, logits times 0.3 (logit_scale; published 0.0625), tied embeddings, attention biases.
"""
from __future__ import annotations

from ...tools.tiny_families import Preset, TinyArch, preset_writer

COHERE2_MOE: Preset = ("Cohere2MoeConfig", "Cohere2MoeForCausalLM", dict(
    hidden_size=64, intermediate_size=16, prefix_dense_intermediate_size=48, num_hidden_layers=5,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=6, num_experts_per_tok=2,
    num_shared_experts=1, shared_expert_combination_strategy="average", expert_selection_fn="softmax",
    layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    mlp_layer_types=["dense", "sparse", "sparse", "sparse", "sparse"], sliding_window=12, logit_scale=0.3,
    attention_bias=True, tie_word_embeddings=True, rms_norm_eps=None, layer_norm_eps=1e-5,
    bos_token_id=None, eos_token_id=None, pad_token_id=None))

ARCHS = {
    "cohere2_moe": TinyArch("Cohere2MoeForCausalLM", "Cohere2-MoE (parallel attention + MoE, sliding + NoPE)",
                            ("float",), write=preset_writer(COHERE2_MOE, drawn=True), expert_width="intermediate_size"),
}

__all__ = ["ARCHS", "COHERE2_MOE"]
