"""The Qwen3-Next family's tiny checkpoints: `moelink make-tiny-model --arch qwen3_next / qwen3_5_moe` and the test
suite's (tests/helpers/hf_checkpoints.py): transformers' own model classes on tiny configs
(engine/tools/tiny_families.save_preset)."""
from __future__ import annotations

from ...tools.tiny_families import TinyArch, preset_writer

# A multimodal config's vision tower, as small as its config class allows (run only where images are on:
# save_multimodal).
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


# The vision tokens a multimodal tiny checkpoint adds after the tiny tokenizer's own (ids VOCAB..VOCAB+3), and a
# rotary that turns on all three axes (8 frequencies: mrope_section [2, 1, 1] gives temporal, height and width some).
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
_MM_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0, "mrope_section": [2, 1, 1]}


# The tiny tokenizer's chat template with Qwen-VL's image parts: an image ({"type": "image"} or "image_url") is its
# placeholder in the user's text, where the part is.
_MM_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- elif part['type'] in ('image', 'image_url') %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def save_multimodal(out, seed: int = 0, vision: dict | None = None, patch_size: int = 4,
                    max_pixels: int = 64 * 64) -> str:
    """A Qwen3.5-MoE multimodal checkpoint that takes images (docs/multimodal.md): transformers'
    Qwen3_5MoeForConditionalGeneration on the qwen3_5_moe preset with the vision tokens in its vocabulary, the tiny
    tokenizer with them added, and the processor saved beside it (Qwen3VLProcessor with the PIL image processor:
    torchvision is not installable here). `vision`: the tower's config fields over _TINY_VISION's."""
    import json
    from pathlib import Path

    import torch
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ...tools.tiny_families import VOCAB, build_hf_model, preset_config, save_model, save_tokenizer

    out = Path(out)
    cfg_cls, model_cls, fields = HF_HYBRID["qwen3_5_moe"]
    fields = {**fields, "vision_config": {**_TINY_VISION, "patch_size": patch_size, **(vision or {})}}
    cfg = preset_config((cfg_cls, model_cls, fields), vocab_size=VOCAB + len(VISION_TOKENS), rope_parameters=_MM_ROPE)
    cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id, cfg.video_token_id = range(
        VOCAB, VOCAB + len(VISION_TOKENS))
    save_model(build_hf_model(cfg, seed), out, cfg, torch.float64)
    save_tokenizer(out)  # the tiny tokenizer's own VOCAB tokens, then the vision tokens after them
    tok = AutoTokenizer.from_pretrained(out)
    tok.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    tok.save_pretrained(out)
    (out / "chat_template.jinja").write_text(_MM_CHAT_TEMPLATE)
    merge = cfg.vision_config.spatial_merge_size
    # Qwen3.5's published normalisation (mean = std = 0.5): a pure black-and-white image normalises to exactly +-1
    # whatever order a preprocessor rounds in (smg's and transformers' then send the same pixels).
    Qwen2VLImageProcessorPil(patch_size=patch_size, temporal_patch_size=cfg.vision_config.temporal_patch_size,
                             merge_size=merge, min_pixels=(patch_size * merge) ** 2, max_pixels=max_pixels,
                             image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen3VLProcessor"}))
    return str(out)


# fp8: gated attention's q / gate regrouping and Qwen3-Next's fused in_proj_qkvz move rows across FP8 blocks, so those
# are held float, dequantized at load (engine/rank/fp8_linears.py; tests/engine/test_fp8_hybrid_families.py).
_FORMATS = ("float", "fp8", "int4", "gptq", "awq", "nvfp4")
ARCHS = {
    "qwen3_next": TinyArch("Qwen3NextForCausalLM", "Qwen3-Next-80B-A3B", _FORMATS,
                           write=preset_writer(HF_HYBRID["qwen3_next"])),
    "qwen3_5_moe": TinyArch("Qwen3_5MoeForConditionalGeneration", "Qwen3.5-MoE (397B-A17B, 122B-A10B, 35B-A3B) as "
                            "published (the text model of a multimodal checkpoint)", _FORMATS,
                            write=preset_writer(HF_HYBRID["qwen3_5_moe"])),
}

__all__ = ["ARCHS", "HF_HYBRID", "VISION_TOKENS", "save_multimodal"]
