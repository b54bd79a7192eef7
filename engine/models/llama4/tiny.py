"""Llama 4's tiny checkpoints: `moelink make-tiny-model --arch llama4` (Scout's layout), `llama4_maverick` and
`llama4_multimodal`, and the test suite's (tests/engine/test_llama4.py). Built by transformers' own Llama4ForCausalLM
(or Llama4ForConditionalGeneration, a one-layer vision tower beside the text model) and drawn by
engine/tools/tiny_families.save_drawn_preset (norm weights random, so a weight loaded into the wrong place shows).

What the family adds at these sizes: chunked attention on the rope layers with attention_chunk_size 16 (the tests'
prompts cross up to ten chunks), layer 3 NoPE with attention temperature tuning whose floor_scale 8 changes the
temperature every 8 positions, the weightless L2 q/k norm, llama3 rope scaling whose bands fall inside the rotary
frequencies (original_max_position_embeddings 64), top-1 of 4 experts by a sigmoid scaling the expert's input beside a
shared expert; Maverick's alternating dense (intermediate_size_mlp 48) and MoE layers without q/k norm.
"""
from __future__ import annotations

from ...tools.tiny_families import Preset, TinyArch, preset_writer

_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
_TEXT = dict(hidden_size=64, intermediate_size=16, intermediate_size_mlp=48, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
             interleave_moe_layer_step=1, attention_chunk_size=16, attn_temperature_tuning=True, floor_scale=8,
             attn_scale=0.5, use_qk_norm=True, rms_norm_eps=1e-5, rope_parameters=_ROPE, bos_token_id=None,
             eos_token_id=None, pad_token_id=None)
# Scout (Llama-4-Scout-17B-16E): every layer MoE, q/k L2-normed on the rope layers.
LLAMA4: Preset = ("Llama4TextConfig", "Llama4ForCausalLM", dict(_TEXT))
# Maverick (Llama-4-Maverick-17B-128E): MoE every other layer (interleave_moe_layer_step 2), dense layers
# intermediate_size_mlp wide, no q/k norm.
LLAMA4_MAVERICK: Preset = ("Llama4TextConfig", "Llama4ForCausalLM",
                           dict(_TEXT, interleave_moe_layer_step=2, use_qk_norm=False))
# The published layout: Llama4ForConditionalGeneration, the text model under language_model., a one-layer vision
# tower (vision_model.) and its projector beside it, neither read.
_VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28,
               patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32,
               pixel_shuffle_ratio=0.5)
LLAMA4_MULTIMODAL: Preset = ("Llama4Config", "Llama4ForConditionalGeneration", dict(_TEXT, vision_config=_VISION))

ARCHS = {
    "llama4": TinyArch("Llama4ForCausalLM", "Llama-4-Scout-17B-16E's text model", ("float",),
                       write=preset_writer(LLAMA4, drawn=True), expert_width="intermediate_size"),
    "llama4_maverick": TinyArch("Llama4ForCausalLM", "Llama-4-Maverick-17B-128E's text model (dense and MoE layers "
                                "alternating)", ("float",), write=preset_writer(LLAMA4_MAVERICK, drawn=True),
                                expert_width="intermediate_size"),
    "llama4_multimodal": TinyArch("Llama4ForConditionalGeneration", "Llama 4 Scout / Maverick as published (the text "
                                  "model under language_model., served text-only)", ("float",),
                                  write=preset_writer(LLAMA4_MULTIMODAL, drawn=True),
                                  expert_width="intermediate_size"),
}

__all__ = ["ARCHS", "LLAMA4", "LLAMA4_MAVERICK", "LLAMA4_MULTIMODAL"]
