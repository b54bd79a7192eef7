"""The Qwen3-Next family's tiny checkpoints: `moelink make-tiny-model --arch qwen3_next / qwen3_5_moe` and the test
suite's (tests/helpers/hf_checkpoints.py): transformers' own model classes on tiny configs
(engine/tools/tiny_families.save_preset)."""
from __future__ import annotations

from ...tools.tiny_families import TinyArch, preset_writer

# A multimodal config's vision tower, as small as its config class allows (never run by moelink).
_TINY_VISION = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16, out_hidden_size=32, patch_size=4,
                    temporal_patch_size=2, spatial_merge_size=2)

# Hybrid models (linear attention beside full attention): kept apart from the DeepSeek family's HF_TINY, whose
# parity tests assume every full block of a prompt can hit the prefix cache (a hybrid model's hits stop at its state
# checkpoints).
HF_HYBRID: dict[str, tuple[str, str, dict]] = {
    # Qwen3-Next layout: gated DeltaNet on 3 layers of 4 (2 q/k heads, 4 value heads), gated full attention with a
    # quarter of each head rotated, a shared expert behind its sigmoid gate, one dense layer (mlp_only_layers).
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=12, linear_conv_kernel_dim=4, num_experts=6, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=24, mlp_only_layers=[4],
        layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention",
                     "full_attention"])),
    # Qwen3.5-MoE as published: a multimodal checkpoint (Qwen3_5MoeForConditionalGeneration: the text model under
    # model.language_model., a vision tower beside it) whose text model has split linear-attention projections.
    "qwen3_5_moe": ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration", dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_conv_kernel_dim=4, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, vision_config=_TINY_VISION)),
}


# No fp8: the q / gate split of gated attention moves rows across FP8 blocks, which the loader refuses.
_FORMATS = ("float", "int4", "gptq", "awq", "nvfp4")
ARCHS = {
    "qwen3_next": TinyArch("Qwen3NextForCausalLM", "Qwen3-Next-80B-A3B", _FORMATS,
                           write=preset_writer(HF_HYBRID["qwen3_next"])),
    "qwen3_5_moe": TinyArch("Qwen3_5MoeForConditionalGeneration", "Qwen3.5-MoE (397B-A17B, 122B-A10B, 35B-A3B) as "
                            "published (the text model of a multimodal checkpoint)", _FORMATS,
                            write=preset_writer(HF_HYBRID["qwen3_5_moe"])),
}

__all__ = ["ARCHS", "HF_HYBRID"]
