"""Granite-MoE's tiny checkpoints: `moelink make-tiny-model --arch granitemoe` / `granitemoeshared` / `granitemoehybrid` and the test
suite's (tests/engine/test_granitemoe.py). Built by transformers' own GraniteMoe(Shared)ForCausalLM and drawn by
engine/tools/tiny_families.save_drawn_preset (norm weights random).

What the family adds at these sizes: the muP multipliers, each away from 1 (embedding 2, residual 0.7, attention
0.1 in place of head_dim ** -0.5 = 0.25, logits divided by 3: granite-3.0-1b-a400m's own, 12 / 0.22 / 1/64 / 6, make
a random tiny model repeat its last token, which would hide a missing layer), top-2 of 6 experts by logits then a
softmax over the two; the Shared model adds a shared MLP 24 wide. The published models tie their embeddings (the
embedding multiplier then folds into the LM head too): the tests run that with tie_word_embeddings=True.
"""
from __future__ import annotations

from ...tools.tiny_families import Preset, TinyArch, preset_writer

_FIELDS = dict(hidden_size=64, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               num_local_experts=6, num_experts_per_tok=2, embedding_multiplier=2.0, residual_multiplier=0.7,
               attention_multiplier=0.1, logits_scaling=3.0, tie_word_embeddings=False, rms_norm_eps=1e-6,
               bos_token_id=None, eos_token_id=None, pad_token_id=None)
GRANITE: Preset = ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(_FIELDS))
GRANITE_SHARED: Preset = ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM",
                          dict(_FIELDS, shared_intermediate_size=24))
# Granite 4.0-H: Mamba2 layers (4 heads of 32 = 2 x hidden, 2 groups, d_state 16, 4 conv taps) around a GQA layer
# without rotary ("nope", as published), every layer's FFN routed plus the shared MLP.
GRANITE_HYBRID: Preset = ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM",
                          dict(_FIELDS, num_hidden_layers=4, shared_intermediate_size=24,
                               layer_types=["mamba", "attention", "mamba", "mamba"], position_embedding_type="nope",
                               mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4,
                               mamba_expand=2, mamba_chunk_size=16))

ARCHS = {
    "granitemoe": TinyArch("GraniteMoeForCausalLM", "granite-3.0-1b-a400m, -3b-a800m, granite-3.1 MoE", ("float",),
                           write=preset_writer(GRANITE, drawn=True), expert_width="intermediate_size"),
    "granitemoeshared": TinyArch("GraniteMoeSharedForCausalLM", "Granite-MoE with a shared expert", ("float",),
                                 write=preset_writer(GRANITE_SHARED, drawn=True), expert_width="intermediate_size"),
    "granitemoehybrid": TinyArch("GraniteMoeHybridForCausalLM", "Granite 4.0-H (Mamba2 + GQA + MoE)", ("float",),
                                 write=preset_writer(GRANITE_HYBRID, drawn=True), expert_width="intermediate_size"),
}

__all__ = ["ARCHS", "GRANITE", "GRANITE_HYBRID", "GRANITE_SHARED"]
