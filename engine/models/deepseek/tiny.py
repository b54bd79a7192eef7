"""The DeepSeek family's tiny checkpoints: `moelink make-tiny-model --arch deepseek_v3 / deepseek_v2 / glm4_moe /
kimi_k2 / kimi_k25 / deepseek_v32 / glm_moe_dsa` and the test suite's (tests/helpers/hf_checkpoints.py). The first
five are sized by make_tiny_model (tiny_hf_model.py writes them; Kimi's on DeepSeek-V3 with its model_type, K2.5
wrapped as published: `kimi_k25_checkpoint`), the DeepSeek Sparse Attention ones are presets (HF_DSA, HF_DSA_FP8)
built by transformers' own model classes (engine/tools/tiny_families.save_preset)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ...tools.tiny_families import QUANT_FORMATS, Preset, TinyArch, preset_writer, published_as, save_preset
from ...tools.tiny_formats import rewrite_checkpoint

_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
         "beta_fast": 32, "beta_slow": 1}
_MLA_SMALL = dict(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10)

# The test suite's DeepSeek-V3 / V2 and GLM-4-MoE variants (tests/helpers/hf_checkpoints.py; make-tiny-model sizes
# these archs itself): n_group > 1 with topk_group < n_group, first_k_dense_replace >= 1, n_shared_experts >= 1, q
# LoRA on and off, YaRN with mscale != mscale_all_dim, interleaved and plain rope, GLM's partial rotary with qkv
# bias and q/k norm, routed-expert counts that are not powers of two. name -> Preset.
HF_TINY: dict[str, tuple[str, str, dict]] = {
    # DeepSeek-V3 layout: q LoRA, interleaved rope, 12 experts in 4 groups (2 chosen), one dense layer.
    "dsv3_lora": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=24,
        **_MLA_SMALL, moe_intermediate_size=16, n_routed_experts=12, n_group=4, topk_group=2,
        num_experts_per_tok=3, first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5)),
    # No q LoRA, YaRN (DeepSeek-V3's rope: factor, mscale, interleaved), biases, 6 experts in 3 groups, 2 shared.
    "dsv3_yarn": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, q_lora_rank=None,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, moe_intermediate_size=16,
        n_routed_experts=6, n_group=3, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
        n_shared_experts=2, norm_topk_prob=False, attention_bias=True,
        rope_parameters=dict(_YARN, mscale=1.0, mscale_all_dim=0.8))),
    # Plain (non-interleaved) rope, no dense layer, 10 experts in one group, tied embeddings.
    "dsv3_neox": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, q_lora_rank=16,
        kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6, moe_intermediate_size=12,
        n_routed_experts=10, n_group=1, topk_group=1, num_experts_per_tok=3, first_k_dense_replace=0,
        n_shared_experts=1, rope_interleave=False, tie_word_embeddings=True)),
    # DeepSeek-V2-Lite layout: no q LoRA, softmax group-limited greedy (9 experts in 3 groups, 1 chosen),
    # V2-Lite's YaRN (mscale = mscale_all_dim = 0.707), 2 shared experts, one dense layer.
    "dsv2_lite": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=None,
        **_MLA_SMALL, moe_intermediate_size=16, n_routed_experts=9, topk_method="group_limited_greedy", n_group=3,
        topk_group=1, num_experts_per_tok=3, first_k_dense_replace=1, n_shared_experts=2,
        routed_scaling_factor=16.0, rope_parameters=dict(_YARN, mscale=0.707, mscale_all_dim=0.707))),
    # DeepSeek-V2 layout: q LoRA, plain greedy top-k over 6 experts, no dense layer, one shared expert.
    "dsv2_lora": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, moe_intermediate_size=16,
        n_routed_experts=6, topk_method="greedy", num_experts_per_tok=2, first_k_dense_replace=0,
        n_shared_experts=1)),
    # GLM-4.5 layout: partial rotary (half of each head), q/k norm, qkv bias, 10 experts in 2 groups (1
    # chosen), one dense layer, one shared expert.
    "glm_bias": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, moe_intermediate_size=16, n_routed_experts=10, n_group=2, topk_group=1, num_experts_per_tok=3,
        first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5, use_qk_norm=True,
        attention_bias=True)),
    # A quarter of each head rotated, with YaRN; no q/k norm, no bias, 6 experts, two shared experts.
    "glm_yarn": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, moe_intermediate_size=16, n_routed_experts=6, n_group=1, topk_group=1, num_experts_per_tok=2,
        first_k_dense_replace=1, n_shared_experts=2, norm_topk_prob=False,
        rope_parameters=dict(_YARN, partial_rotary_factor=0.25))),
}

# DeepSeek Sparse Attention (issue 43): MLA with a lightning indexer, index_topk small so prompts of 1..150 tokens go
# sparse. 16 index heads keep exact ties of the index scores (a key whose every head's ReLU is 0) out of the top-k
# boundary, where transformers' torch.topk and moelink's selection may break them differently.
HF_DSA: dict[str, tuple[str, str, dict]] = {
    # DeepSeek-V3.2 layout: half-split indexer rope, 12 experts in 4 groups, one dense layer, top-8.
    "dsv32": ("DeepseekV32Config", "DeepseekV32ForCausalLM", dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=24,
        **_MLA_SMALL, moe_intermediate_size=16, n_routed_experts=12, n_group=4, topk_group=2,
        num_experts_per_tok=3, first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5,
        index_topk=8, index_n_heads=16, index_head_dim=16)),
    # GLM-5 layout: interleaved indexer rope, layer 1 shares layer 0's selection ("FSF"), YaRN, MLA biases,
    # 10 experts in one group, top-12.
    "glm5": ("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM", dict(
        hidden_size=48, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=16,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, moe_intermediate_size=16,
        n_routed_experts=10, n_group=1, topk_group=1, num_experts_per_tok=3, first_k_dense_replace=1,
        n_shared_experts=1, attention_bias=True, index_topk=12, index_n_heads=16, index_head_dim=12,
        indexer_types=["full", "shared", "full"], rope_parameters=dict(_YARN, mscale=1.0, mscale_all_dim=0.8))),
}

# DeepSeek-V3.2 for FP8 blocks of 16 x 16: every head's q rows (8 nope + 8 rope) and kv_a's rope rows inside one block
# (the rope de-interleave may reorder rows only within a block), the indexer's 16 heads of 16.
HF_DSA_FP8: dict[str, tuple[str, str, dict]] = {
    "dsv32_fp8": ("DeepseekV32Config", "DeepseekV32ForCausalLM", dict(
        hidden_size=48, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32,
        kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, moe_intermediate_size=16,
        n_routed_experts=6, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_shared_experts=1, index_topk=8, index_n_heads=16, index_head_dim=16)),
}


def kimi_k25_checkpoint(dsv3_dir: str, out: Path) -> str:
    """A DeepSeek-V3-shaped checkpoint as Kimi K2.5 publishes its multimodal one: config.json's architectures
    [KimiK25ForConditionalGeneration], model_type kimi_k25, the text model's config under text_config (model_type
    kimi_k2) and the quantization at the top level; the text model's tensors under `language_model.model.` and its
    head as `language_model.lm_head.weight`, with a vision tower's and projector's tensors beside them."""
    def tensors(ts: dict) -> dict:
        new = {}
        for name, t in ts.items():
            if name.startswith("model."):
                new["language_model." + name] = t
            elif name.startswith("lm_head."):
                new["language_model." + name] = t
            else:
                new[name] = t
        g = torch.Generator().manual_seed(5)
        new["vision_tower.encoder.blocks.0.wqkv.weight"] = torch.randn(24, 8, generator=g, dtype=torch.bfloat16)
        new["vision_tower.patch_embed.proj.weight"] = torch.randn(8, 3, 2, 2, generator=g, dtype=torch.bfloat16)
        new["mm_projector.proj.0.weight"] = torch.randn(16, 32, generator=g, dtype=torch.bfloat16)
        return new

    def config(c: dict) -> dict:
        quant = c.pop("quantization_config", None)
        text = {**c, "model_type": "kimi_k2"}
        text.pop("architectures", None)
        top = {"architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25", "text_config": text,
               "vision_config": {"model_type": "kimi_k25_vision"}, "media_placeholder_token_id": 3,
               "tie_word_embeddings": False}
        if quant is not None:
            top["quantization_config"] = quant
        return top

    return rewrite_checkpoint(Path(dsv3_dir), Path(out), tensors, config)


def _write_dsa(name: str):
    """The writer of HF_DSA[name]; in FP8, DeepSeek-V3.2's FP8-shaped preset (HF_DSA_FP8)."""
    def write(out: Path, *, seed: int, dtype: torch.dtype, fmt: str, overrides: Mapping) -> str:
        preset = HF_DSA_FP8[f"{name}_fp8"] if fmt == "fp8" and f"{name}_fp8" in HF_DSA_FP8 else HF_DSA[name]
        return save_preset(out, preset, seed, dtype=dtype, **overrides)

    return write


_FORMATS = ("float",) + QUANT_FORMATS
# GLM-4.7-Flash (Glm4MoeLiteForCausalLM): MLA with q LoRA and interleaved rope, values wider than the nope part of
# q/k (its 256 beside 192), a dense layer between routed ones (mlp_layer_types: transformers' lite model reads no
# first_k_dense_replace), 8 experts in 2 groups (1 chosen, top-2) with the correction bias, one shared expert,
# routed_scaling_factor 1.8 (the release's). Drawn by save_drawn_preset (norms and the correction bias random).
GLM4_MOE_LITE: Preset = ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", dict(
    hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
    n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2, n_shared_experts=1,
    routed_scaling_factor=1.8, norm_topk_prob=True, mlp_layer_types=["dense", "sparse", "dense", "sparse"],
    rope_interleave=True, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None))

# Sarvam-105B (SarvamMLAForCausalLM): transformers' DeepseekV3ForCausalLM on a SarvamMLAConfig, as published: no q LoRA,
# interleaved rope, experts routed over one group, one dense layer, one shared expert; config.json names the published
# architecture (published_as).
SARVAM_MLA: Preset = ("SarvamMLAConfig", "DeepseekV3ForCausalLM", dict(
    hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=None, **_MLA_SMALL,
    moe_intermediate_size=16, n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2,
    first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=None, eos_token_id=None,
    pad_token_id=None))

ARCHS = {
    "deepseek_v3": TinyArch("DeepseekV3ForCausalLM", "DeepSeek-V3, DeepSeek-R1", _FORMATS, sized="deepseek_v3"),
    "deepseek_v2": TinyArch("DeepseekV2ForCausalLM", "DeepSeek-V2, DeepSeek-V2-Lite", _FORMATS, sized="deepseek_v2"),
    "glm4_moe": TinyArch("Glm4MoeForCausalLM", "GLM-4.5, GLM-4.5-Air, GLM-4.6", _FORMATS, sized="glm4_moe"),
    "kimi_k2": TinyArch("DeepseekV3ForCausalLM", "Kimi K2, K2 Thinking (model_type kimi_k2; INT4 experts as K2 "
                        "Thinking publishes them, FP8 as K2)", ("int4", "float", "fp8"), sized="deepseek_v3",
                        model_type="kimi_k2"),
    "kimi_k25": TinyArch("KimiK25ForConditionalGeneration", "Kimi K2.5 (its text model under language_model., a "
                         "vision tower's tensors beside it; INT4 experts)", ("int4", "float"), sized="deepseek_v3",
                         model_type="kimi_k2", wrap=kimi_k25_checkpoint),
    "deepseek_v32": TinyArch("DeepseekV32ForCausalLM", "DeepSeek-V3.2 (-Exp)", _FORMATS, write=_write_dsa("dsv32")),
    # FP8: the indexer's heads one 16-row block each (the rope de-interleave keeps rows inside their block).
    "glm_moe_dsa": TinyArch("GlmMoeDsaForCausalLM", "GLM-5", _FORMATS, write=_write_dsa("glm5"),
                            format_fields={"fp8": {"index_head_dim": 16}}),
    "glm4_moe_lite": TinyArch("Glm4MoeLiteForCausalLM", "GLM-4.7-Flash", ("float", "fp8"),
                              write=preset_writer(GLM4_MOE_LITE, drawn=True)),
    "sarvam_mla": TinyArch("SarvamMLAForCausalLM", "Sarvam-105B", ("float",),
                           write=published_as(preset_writer(SARVAM_MLA, drawn=True), "SarvamMLAForCausalLM")),
}



# Kimi K2.5 in transformers' own form (Kimi_K25ForConditionalGeneration: MoonViT and its projector beside the
# DeepSeek-V3 text model; docs/multimodal.md): the dsv3_lora text preset, a one-block tower at patch 4, merge 2x2
# (a 16 x 24 image is 6 tokens), Kimi's media tokens after the tiny tokenizer's own (ids VOCAB..VOCAB+3).
KIMI_MEDIA_TOKENS = ("<|media_begin|>", "<|media_end|>", "<|media_pad|>", "<|kimi_k25_video_placeholder|>")
_KIMI_VISION = dict(patch_size=4, pos_emb_height=8, pos_emb_width=8, pos_emb_time=4, num_attention_heads=2,
                    num_hidden_layers=1, hidden_size=16, intermediate_size=32, merge_kernel_size=[2, 2])


def save_kimi_k25_multimodal(out, seed: int = 0, max_side: int = 64) -> str:
    """A Kimi K2.5 multimodal checkpoint that takes images, written by transformers' save_pretrained in its own
    tensor names (save_original_format=False: transformers' reverse of the published names is not the published
    layout), the tiny tokenizer with Kimi's media tokens added, and the image processor's config beside it:
    Kimi_K25ImageProcessor's own save_pretrained where torchvision is installed; without it (not installable here:
    the class imports it) the same fields as JSON, which the processor reads where torchvision is."""
    import json

    import transformers
    from transformers import AutoTokenizer

    from ...tools.tiny_families import MAX_POS, VOCAB, build_hf_model, save_model, save_tokenizer

    out = Path(out)
    text = {"model_type": "deepseek_v3", "vocab_size": VOCAB + len(KIMI_MEDIA_TOKENS), "max_position_embeddings":
            MAX_POS, "initializer_range": 0.1, **HF_TINY["dsv3_lora"][2]}
    begin, end, pad, video = range(VOCAB, VOCAB + len(KIMI_MEDIA_TOKENS))
    cfg = transformers.Kimi_K25Config(
        text_config=text, vision_config=_KIMI_VISION, projection_hidden_size=_KIMI_VISION["hidden_size"],
        image_token_id=pad, video_token_id=video, vision_start_token_id=begin, vision_end_token_id=end,
        tie_word_embeddings=False)
    cfg.architectures = ["Kimi_K25ForConditionalGeneration"]
    save_model(build_hf_model(cfg, seed), out, cfg, torch.float64, fused=True)
    save_tokenizer(out)  # the tiny tokenizer's own VOCAB tokens, then the media tokens after them
    tok = AutoTokenizer.from_pretrained(out)
    tok.add_special_tokens({"additional_special_tokens": list(KIMI_MEDIA_TOKENS)})
    tok.save_pretrained(out)
    fields = dict(patch_size=_KIMI_VISION["patch_size"], merge_size=_KIMI_VISION["merge_kernel_size"][0],
                  size={"max_height": max_side, "max_width": max_side})
    try:
        from transformers.models.kimi_k25.image_processing_kimi_k25 import Kimi_K25ImageProcessor
    except ImportError:  # no torchvision
        (out / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "Kimi_K25ImageProcessor", "processor_class": "Kimi_K25Processor", **fields}))
    else:
        Kimi_K25ImageProcessor(**fields).save_pretrained(out)
    return str(out)


__all__ = ["ARCHS", "GLM4_MOE_LITE", "HF_DSA", "HF_DSA_FP8", "HF_TINY", "KIMI_MEDIA_TOKENS", "kimi_k25_checkpoint",
           "SARVAM_MLA", "save_kimi_k25_multimodal"]
