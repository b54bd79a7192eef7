"""Tiny random checkpoints of the families moelink serves, built and saved by transformers itself.

Each is transformers' own model class on a tiny config (hidden 32-64, 2-5 layers), randomly initialised with a fixed
seed, made float64 and written by `save_pretrained`, with the tiny tokenizer beside it (tiny_corpus.py): the layout
and config.json are exactly what transformers writes, so transformers is the oracle of moelink's model code on them.
What transformers initialises to constants (biases, norm weights, sinks, DeepSeek's e_score_correction_bias, V4's
hyper-connection bases and hash table) gets random values here, so a weight loaded into the wrong place shows.

These are the test suite's checkpoints (tests/helpers/*_checkpoints.py re-export them) and what
`moelink make-tiny-model --arch NAME` writes for the families tiny_model.py does not write itself (tiny_model.ARCHS).
Same seed, same bytes. The presets, by table:

- HF_TINY: DeepSeek-V3 / V2 and GLM-4-MoE variants (n_group > 1 with topk_group < n_group, first_k_dense_replace >= 1,
  n_shared_experts >= 1, q LoRA on and off, YaRN with mscale != mscale_all_dim, interleaved and plain rope, GLM's
  partial rotary with qkv bias and q/k norm, routed-expert counts that are not powers of two);
- HF_HYBRID: Qwen3-Next and Qwen3.5-MoE (gated DeltaNet beside gated full attention; Qwen3.5 as published, a
  multimodal checkpoint whose text model is served);
- HF_DSA / HF_DSA_FP8: DeepSeek-V3.2 and GLM-5 (DeepSeek Sparse Attention with a small index_topk);
- M2_TINY: MiniMax-M2 and MiMo-V2-Flash; `save_gpt_oss`: gpt-oss; `save_dsv4_checkpoint`: DeepSeek-V4;
- FP8_TINY, NVFP4_TINY, INT4_TINY: Qwen3-MoE / DeepSeek-V3 shapes for the quantized formats (tiny_formats.py).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .file_modes import umask_mode

VOCAB, MAX_POS = 400, 512

# -- DeepSeek / GLM / Qwen3-Next / Qwen3.5 / DSA (tests/helpers/hf_checkpoints.py) -----------------------------------

_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
         "beta_fast": 32, "beta_slow": 1}
_MLA_SMALL = dict(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10)

# name -> (transformers model_type, config fields beyond the common ones)
HF_TINY: dict[str, tuple[str, dict]] = {
    # DeepSeek-V3 layout: q LoRA, interleaved rope, 12 experts in 4 groups (2 chosen), one dense layer.
    "dsv3_lora": ("deepseek_v3", dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=24,
        **_MLA_SMALL, moe_intermediate_size=16, n_routed_experts=12, n_group=4, topk_group=2,
        num_experts_per_tok=3, first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5)),
    # No q LoRA, YaRN (DeepSeek-V3's rope: factor, mscale, interleaved), biases, 6 experts in 3 groups, 2 shared.
    "dsv3_yarn": ("deepseek_v3", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, q_lora_rank=None,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, moe_intermediate_size=16,
        n_routed_experts=6, n_group=3, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
        n_shared_experts=2, norm_topk_prob=False, attention_bias=True,
        rope_parameters=dict(_YARN, mscale=1.0, mscale_all_dim=0.8))),
    # Plain (non-interleaved) rope, no dense layer, 10 experts in one group, tied embeddings.
    "dsv3_neox": ("deepseek_v3", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, q_lora_rank=16,
        kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6, moe_intermediate_size=12,
        n_routed_experts=10, n_group=1, topk_group=1, num_experts_per_tok=3, first_k_dense_replace=0,
        n_shared_experts=1, rope_interleave=False, tie_word_embeddings=True)),
    # DeepSeek-V2-Lite layout: no q LoRA, softmax group-limited greedy (9 experts in 3 groups, 1 chosen),
    # V2-Lite's YaRN (mscale = mscale_all_dim = 0.707), 2 shared experts, one dense layer.
    "dsv2_lite": ("deepseek_v2", dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=None,
        **_MLA_SMALL, moe_intermediate_size=16, n_routed_experts=9, topk_method="group_limited_greedy", n_group=3,
        topk_group=1, num_experts_per_tok=3, first_k_dense_replace=1, n_shared_experts=2,
        routed_scaling_factor=16.0, rope_parameters=dict(_YARN, mscale=0.707, mscale_all_dim=0.707))),
    # DeepSeek-V2 layout: q LoRA, plain greedy top-k over 6 experts, no dense layer, one shared expert.
    "dsv2_lora": ("deepseek_v2", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, moe_intermediate_size=16,
        n_routed_experts=6, topk_method="greedy", num_experts_per_tok=2, first_k_dense_replace=0,
        n_shared_experts=1)),
    # GLM-4.5 layout: partial rotary (half of each head), q/k norm, qkv bias, 10 experts in 2 groups (1
    # chosen), one dense layer, one shared expert.
    "glm_bias": ("glm4_moe", dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, moe_intermediate_size=16, n_routed_experts=10, n_group=2, topk_group=1, num_experts_per_tok=3,
        first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5, use_qk_norm=True,
        attention_bias=True)),
    # A quarter of each head rotated, with YaRN; no q/k norm, no bias, 6 experts, two shared experts.
    "glm_yarn": ("glm4_moe", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, moe_intermediate_size=16, n_routed_experts=6, n_group=1, topk_group=1, num_experts_per_tok=2,
        first_k_dense_replace=1, n_shared_experts=2, norm_topk_prob=False,
        rope_parameters=dict(_YARN, partial_rotary_factor=0.25))),
}

# Hybrid models (linear attention beside full attention): kept apart from HF_TINY, whose parity tests assume every
# full block of a prompt can hit the prefix cache (a hybrid model's hits stop at its state checkpoints).
HF_HYBRID: dict[str, tuple[str, dict]] = {
    # Qwen3-Next layout: gated DeltaNet on 3 layers of 4 (2 q/k heads, 4 value heads), gated full attention with a
    # quarter of each head rotated, a shared expert behind its sigmoid gate, one dense layer (mlp_only_layers).
    "qwen3_next": ("qwen3_next", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=12, linear_conv_kernel_dim=4, num_experts=6, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=24, mlp_only_layers=[4],
        layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention",
                     "full_attention"])),
    # Qwen3.5-MoE as published: a multimodal checkpoint (Qwen3_5MoeForConditionalGeneration: the text model under
    # model.language_model., a vision tower beside it) whose text model has split linear-attention projections.
    "qwen3_5_moe": ("qwen3_5_moe", dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_conv_kernel_dim=4, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24)),
}

# DeepSeek Sparse Attention (issue 43): MLA with a lightning indexer, index_topk small so prompts of 1..150 tokens go
# sparse. 16 index heads keep exact ties of the index scores (a key whose every head's ReLU is 0) out of the top-k
# boundary, where transformers' torch.topk and moelink's selection may break them differently.
HF_DSA: dict[str, tuple[str, dict]] = {
    # DeepSeek-V3.2 layout: half-split indexer rope, 12 experts in 4 groups, one dense layer, top-8.
    "dsv32": ("deepseek_v32", dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=24,
        **_MLA_SMALL, moe_intermediate_size=16, n_routed_experts=12, n_group=4, topk_group=2,
        num_experts_per_tok=3, first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5,
        index_topk=8, index_n_heads=16, index_head_dim=16)),
    # GLM-5 layout: interleaved indexer rope, layer 1 shares layer 0's selection ("FSF"), YaRN, MLA biases,
    # 10 experts in one group, top-12.
    "glm5": ("glm_moe_dsa", dict(
        hidden_size=48, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=16,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, moe_intermediate_size=16,
        n_routed_experts=10, n_group=1, topk_group=1, num_experts_per_tok=3, first_k_dense_replace=1,
        n_shared_experts=1, attention_bias=True, index_topk=12, index_n_heads=16, index_head_dim=12,
        indexer_types=["full", "shared", "full"], rope_parameters=dict(_YARN, mscale=1.0, mscale_all_dim=0.8))),
}

# DeepSeek-V3.2 for FP8 blocks of 16 x 16: every head's q rows (8 nope + 8 rope) and kv_a's rope rows inside one block
# (the rope de-interleave may reorder rows only within a block), the indexer's 16 heads of 16.
HF_DSA_FP8: dict[str, tuple[str, dict]] = {
    "dsv32_fp8": ("deepseek_v32", dict(
        hidden_size=48, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32,
        kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, moe_intermediate_size=16,
        n_routed_experts=6, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_shared_experts=1, index_topk=8, index_n_heads=16, index_head_dim=16)),
}

_CLASSES = {
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM"),
    "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM"),
    "glm_moe_dsa": ("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM"),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM"),
    "qwen3_5_moe": ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration"),
}
# A multimodal config's vision tower, as small as its config class allows (never run by moelink).
_TINY_VISION = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16, out_hidden_size=32, patch_size=4,
                    temporal_patch_size=2, spatial_merge_size=2)


def hf_config(name: str, **overrides):
    """transformers' config of preset `name` (HF_TINY, HF_HYBRID, HF_DSA, HF_DSA_FP8), `overrides` on top (a
    multimodal one's go into its text_config)."""
    import transformers

    model_type, fields = {**HF_TINY, **HF_HYBRID, **HF_DSA, **HF_DSA_FP8}[name]
    config_cls, model_cls = _CLASSES[model_type]
    common = dict(vocab_size=VOCAB, max_position_embeddings=MAX_POS, initializer_range=0.1)
    if model_cls.endswith("ForConditionalGeneration"):  # multimodal: the text model's fields in text_config
        cfg = getattr(transformers, config_cls)(text_config={**common, **fields, **overrides},
                                                vision_config=_TINY_VISION)
    else:
        cfg = getattr(transformers, config_cls)(**{**common, **fields, **overrides})
    cfg.architectures = [model_cls]
    return cfg


def _randomize_constants(model, seed: int) -> None:
    """Random values where transformers initialises constants: Linear biases, (gated) RMSNorm weights, the DSA
    indexer's LayerNorm, DeepSeek's e_score_correction_bias (one generator, module order: same seed, same values)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod_name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g, dtype=torch.float64) * 0.1)
            if type(mod).__name__.endswith(("RMSNorm", "RMSNormGated")):
                mod.weight.add_(torch.randn(mod.weight.shape, generator=g, dtype=torch.float64) * 0.1)
            if isinstance(mod, torch.nn.LayerNorm) and ".indexer." in mod_name:  # DSA's k_norm: weight and bias
                mod.weight.add_(torch.randn(mod.weight.shape, generator=g, dtype=torch.float64) * 0.1)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g, dtype=torch.float64) * 0.1)
            bias = getattr(mod, "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_(torch.randn(bias.shape, generator=g, dtype=bias.dtype) * 0.05)


def save_tokenizer(out: Path, cfg=None) -> None:
    """The tiny byte-level BPE tokenizer (tiny_corpus.py) and its configs, for `cfg`'s vocabulary and context
    (a multimodal config's text_config; VOCAB and MAX_POS without a config)."""
    from .tiny_corpus import train_tiny_tokenizer, write_tokenizer_configs

    text = getattr(cfg, "text_config", None) or cfg
    vocab = getattr(text, "vocab_size", None) or VOCAB
    max_pos = getattr(text, "max_position_embeddings", None) or MAX_POS
    tok = train_tiny_tokenizer(vocab)
    tok.save(str(Path(out) / "tokenizer.json"))
    write_tokenizer_configs(Path(out), tok, max_pos)


def save_model(model, out: Path, cfg=None, dtype: torch.dtype = torch.float64, fused: bool = False) -> str:
    """`model` in `dtype` by save_pretrained (`fused`: in transformers 5's own names, save_original_format=False)
    into `out`, the tiny tokenizer beside it, every file 0666 minus the umask."""
    out = Path(out)
    model.to(dtype).save_pretrained(out, **({"save_original_format": False} if fused else {}))
    umask_mode(out.glob("*.safetensors"))
    save_tokenizer(out, cfg if cfg is not None else model.config)
    return str(out)


def build_hf_model(cfg, seed: int = 0):
    """transformers' own model class of `cfg` in float64, its constants randomised (`_randomize_constants`)."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cfg.architectures[0])(cfg).to(torch.float64)
    _randomize_constants(model, seed)
    return model


def save_hf_checkpoint(out: Path, name: str, seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> str:
    """Build preset `name` (hf_config) with transformers, randomise what it initialises to constants, save it +
    tokenizer."""
    cfg = hf_config(name, **overrides)
    return save_model(build_hf_model(cfg, seed), out, cfg, dtype)


# -- MiniMax-M2 and MiMo-V2-Flash (tests/helpers/m2_checkpoints.py) -----------------------------------------------

WINDOW = 6

# name -> (config class, model class, fields). MiniMax-M2: q/k RMSNorm over all heads at once (noisy so a per-head
# norm would differ), a quarter of each head rotated, GQA 4 / 2, sigmoid routing over 6 experts with a correction
# bias beside the router, Mixtral's expert names, every layer routed. MiMo-V2-Flash: layer_types mixing full and
# sliding-window layers unequally, the sliding ones with twice the kv heads, sinks and a rope of their own, values
# narrower than q/k scaled by attention_value_scale, q/k/v biases, a dense first layer, DeepSeek-V3 routing over 8
# experts in 2 groups, a 6-token window.
M2_TINY: dict[str, tuple[str, str, dict]] = {
    "minimax": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM", dict(
        hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, rotary_dim=4, num_local_experts=6, num_experts_per_tok=2, rope_theta=10000.0,
        bos_token_id=None, eos_token_id=None)),
    "mimo": ("MiMoV2FlashConfig", "MiMoV2FlashForCausalLM", dict(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=1, head_dim=24, v_head_dim=16, n_routed_experts=8, n_group=2, topk_group=1,
        num_experts_per_tok=2, sliding_window=WINDOW, attention_bias=True, attention_value_scale=0.707,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse", "sparse"],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.334},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5}},
        bos_token_id=None)),
}


def m2_config(name: str, **overrides):
    import transformers

    config_cls, model_cls, fields = M2_TINY[name]
    cfg = getattr(transformers, config_cls)(**{"vocab_size": VOCAB, "max_position_embeddings": MAX_POS,
                                               "initializer_range": 0.1, **fields, **overrides})
    cfg.architectures = [model_cls]
    return cfg


def save_m2_checkpoint(out: Path, name: str, seed: int = 0, dtype: torch.dtype = torch.float64, fused: bool = False,
                       **overrides) -> str:
    """Build M2_TINY[name] with transformers, draw what it initialises to constants, save it + the tokenizer.
    `fused`: in transformers 5's own names (save_original_format=False: experts.gate_up_proj / down_proj, the
    router at mlp.gate, MiMo's sinks as self_attn.sinks), not the published ones. The MiniMax correction bias is
    drawn in float32: transformers keeps it in the model dtype and adds it to float32 sigmoid scores, moelink holds
    it in float32 as every serving engine does; drawn in float32 the two sums differ only by that add's rounding."""
    import transformers

    cfg = m2_config(name, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, cfg.architectures[0])(cfg).to(torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
            elif pname.endswith(".bias"):  # q/k/v biases (MiMo's attention_bias)
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1)
            elif pname.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        for mod in model.modules():
            bias = getattr(mod, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_((torch.randn(bias.shape, generator=g) * 0.05).to(bias.dtype))
    return save_model(model, out, cfg, dtype, fused)


# -- gpt-oss (tests/helpers/gpt_oss_checkpoints.py) ----------------------------------------------------------------

GPT_OSS_YARN = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "original_max_position_embeddings": 64}


def gpt_oss_config(**overrides):
    """layer_types alternating sliding / full attention with a 6-token window, q/k/v/o biases, per-head sinks, a
    router bias, expert biases, the clamped SwiGLU with a small swiglu_limit (0.6: the clamps engage), YaRN with
    `truncate: false`, GQA 4 / 2, 5 experts, top-2."""
    import transformers

    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=5,
                  num_experts_per_tok=2, sliding_window=WINDOW, max_position_embeddings=MAX_POS,
                  swiglu_limit=0.6, rope_parameters=dict(GPT_OSS_YARN), rms_norm_eps=1e-5, tie_word_embeddings=False)
    fields.update(overrides)
    cfg = transformers.GptOssConfig(**fields)
    cfg.architectures = ["GptOssForCausalLM"]
    return cfg


def _gpt_oss_draw(name: str, p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Every parameter drawn (transformers initialises biases to 0, sinks with std 0.02): fan-in scaled matrices,
    gains on router and head, noisy norms, biases of std 0.1, sinks of std 1 (a real share of the softmax)."""
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
    if name.endswith("bias"):  # q/k/v/o, router, gate_up_proj_bias, down_proj_bias
        return 0.1 * torch.randn(p.shape, generator=gen)
    if name.endswith("sinks"):
        return torch.randn(p.shape, generator=gen)
    if "embed_tokens" in name:
        return torch.randn(p.shape, generator=gen)
    if name.endswith("experts.gate_up_proj"):  # [E, D, 2I]: x @ W, fan-in D
        fan_in, gain = p.shape[1], 1.0
    elif name.endswith("experts.down_proj"):  # [E, I, D]
        fan_in, gain = p.shape[1], 1.0
    else:
        fan_in = p.shape[-1]
        gain = 4.0 if name.startswith("lm_head") else 2.0 if "router" in name else 1.0
    return gain / math.sqrt(fan_in) * torch.randn(p.shape, generator=gen)


def save_gpt_oss(out: Path, dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> str:
    """Build the tiny GptOssForCausalLM, draw its weights, save it in `dtype` with the tiny tokenizer."""
    import transformers

    cfg = gpt_oss_config(**overrides)
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(cfg).to(torch.float64)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_gpt_oss_draw(name, p, gen))
    return save_model(model, out, cfg, dtype)


# -- DeepSeek-V4 (tests/helpers/dsv4_checkpoint.py) ------------------------------------------------------------------

# Compress rates of the tiny config: the block size of the engine's cache must be a multiple of both.
CSA_RATE, HCA_RATE = 2, 8

# One layer of each attention kind (sliding only, compressed sparse attention at rate 2 with an indexer top-4 (16
# index heads keep exact ties of the index scores out of the top-k boundary), heavily compressed attention at rate
# 8), a window of 6 tokens, three hyper-connection streams, two hash-routed MoE layers, sqrtsoftplus routing with a
# correction bias after them, a shared expert, and SwiGLU clamped at a limit the random weights reach.
DSV4_TINY = dict(
    vocab_size=VOCAB, max_position_embeddings=MAX_POS, initializer_range=0.1,
    hidden_size=32, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
    head_dim=16, partial_rotary_factor=0.5, q_lora_rank=16, num_experts_per_tok=2, n_routed_experts=6,
    n_shared_experts=1, routed_scaling_factor=1.5, rope_theta=10000.0, compress_rope_theta=40000.0,
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                 "compressed_sparse_attention"],
    compress_rates={"compressed_sparse_attention": CSA_RATE, "heavily_compressed_attention": HCA_RATE},
    mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
    hc_mult=3, hc_sinkhorn_iters=6, swiglu_limit=0.6, sliding_window=6, o_groups=2, o_lora_rank=8,
    index_n_heads=16, index_head_dim=8, index_topk=4, num_nextn_predict_layers=0,
)


def dsv4_config(**overrides):
    from transformers import DeepseekV4Config

    cfg = DeepseekV4Config(**{**DSV4_TINY, **overrides})
    cfg.architectures = ["DeepseekV4ForCausalLM"]
    return cfg


def build_dsv4_model(cfg, seed: int = 0):
    """transformers' DeepseekV4ForCausalLM in float64, with what it initialises to constants randomised (sinks,
    position biases, the hyper-connection bases and scales, norms, the correction bias, the hash table: each token's
    k distinct experts at random)."""
    from transformers import DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(cfg).to(torch.float64)
    g = torch.Generator().manual_seed(seed + 1)

    def rand_like(t, scale):
        return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) * scale

    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("sinks", "position_bias", "base", "hc_base"):
                p.copy_(rand_like(p, 0.5))
            elif leaf in ("scale", "hc_scale"):
                p.copy_(1.0 + rand_like(p, 0.3))
            elif "norm" in name and leaf == "weight":
                p.add_(rand_like(p, 0.1))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(rand_like(b, 0.05))
            elif name.endswith("tid2eid"):
                E = cfg.n_routed_experts
                b.copy_(torch.stack([torch.randperm(E, generator=g)[: b.shape[1]] for _ in range(b.shape[0])]))
    return model


def save_dsv4_checkpoint(out: Path, seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> str:
    """Build the tiny V4 with transformers, randomise what it initialises to constants, save it + a tokenizer."""
    cfg = dsv4_config(**overrides)
    return save_model(build_dsv4_model(cfg, seed), out, cfg, dtype)


# -- Qwen3-MoE / DeepSeek-V3 shapes for the quantized formats (tests/helpers/{fp8,nvfp4,int4}_checkpoints.py) ---------

# FP8 blocks of 16 x 16 (tiny_formats.FP8_BLOCK): in the first three every stacked piece starts on a block boundary
# (q 64 / k 32 / v 32; MLA's q_a 32 then kv_a 40; gate / up 16, 48), while ragged blocks occur too: hidden 40 (= 2.5
# blocks), MLA's kv_a 40 rows (24 without q LoRA), and 6 experts; DeepSeek-V3's interleaved rope keeps each head's
# de-interleaved rope rows inside one block. The `*_ragged` ones (issue 27) have pieces that end mid-block, as
# DeepSeek-V2-Lite's dense MLP (10944 = 85.5 blocks of 128) and experts of width 160 or 96 do.
FP8_TINY: dict[str, tuple[str, str, dict]] = {
    "qwen3_fp8": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        moe_intermediate_size=16, intermediate_size=48, num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1],
        norm_topk_prob=True)),
    "dsv3_fp8": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        hidden_size=40, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32,
        kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, moe_intermediate_size=16,
        n_routed_experts=6, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_shared_experts=1, routed_scaling_factor=2.5)),
    # q_proj without q LoRA (its 32 rows stacked before kv_a), biases on kv_a and o, two shared experts.
    "dsv3_fp8_noq": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        hidden_size=40, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=None,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, moe_intermediate_size=16,
        n_routed_experts=6, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_shared_experts=2, routed_scaling_factor=2.5, attention_bias=True)),
    # k and v of 24 rows (v starts at 72), experts 20 wide, the dense layer 24 wide.
    "qwen3_fp8_ragged": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
        moe_intermediate_size=20, intermediate_size=24, num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1],
        norm_topk_prob=True)),
    # q_a 24 rows then kv_a (with biases on both), experts and the shared expert 12 wide, the dense layer 40.
    "dsv3_fp8_ragged": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        hidden_size=40, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=24,
        kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, moe_intermediate_size=12,
        n_routed_experts=6, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_shared_experts=1, routed_scaling_factor=2.5, attention_bias=True)),
    # DeepSeek-V2-Lite's layout (no q LoRA, group-limited greedy over 9 experts, 2 shared experts, a dense first
    # layer): the dense layer 56 wide, experts 20, the shared MLP 40.
    "dsv2_fp8_ragged": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=None,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, moe_intermediate_size=20,
        n_routed_experts=9, topk_method="group_limited_greedy", n_group=3, topk_group=1, num_experts_per_tok=3,
        first_k_dense_replace=1, n_shared_experts=2, routed_scaling_factor=16.0)),
    # The widths of issue 27 itself, for 128 x 128 blocks: the dense layer 200 wide (1.56 blocks, as 10944 is 85.5),
    # experts 160 (V2-Lite-like, 2 shared: 320) and, in the Qwen3 one, 96 with a dense layer of 200.
    "dsv2_fp8_128": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        hidden_size=40, intermediate_size=200, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=None,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, moe_intermediate_size=160,
        n_routed_experts=9, topk_method="group_limited_greedy", n_group=3, topk_group=1, num_experts_per_tok=3,
        first_k_dense_replace=1, n_shared_experts=2, routed_scaling_factor=16.0)),
    "qwen3_fp8_128": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        moe_intermediate_size=96, intermediate_size=200, num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1],
        norm_topk_prob=True)),
}

# NVFP4: hidden and expert sizes multiples of 16 (one e4m3 scale per 16 values).
NVFP4_TINY: dict[str, tuple[str, str, dict]] = {
    "qwen3": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        moe_intermediate_size=32, intermediate_size=48, num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1],
        norm_topk_prob=True)),
    "dsv3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32,
        kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, moe_intermediate_size=16,
        n_routed_experts=6, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_shared_experts=1, routed_scaling_factor=2.5)),
}

# INT4: every reduction dim a multiple of the group (32): hidden 64, expert width 32, o_proj's input 64 / 32.
INT4_TINY: dict[str, tuple[str, str, dict]] = {
    "qwen3": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        moe_intermediate_size=32, intermediate_size=64, num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1],
        norm_topk_prob=True)),
    "dsv3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, q_lora_rank=32,
        kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, moe_intermediate_size=32,
        n_routed_experts=6, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_shared_experts=1, routed_scaling_factor=2.5)),
}


def preset_config(preset: tuple[str, str, dict], **overrides):
    """transformers' config of a (config class, model class, fields) preset (FP8_TINY, NVFP4_TINY, INT4_TINY)."""
    import transformers

    config_cls, model_cls, fields = preset
    cfg = getattr(transformers, config_cls)(**{"vocab_size": VOCAB, "max_position_embeddings": MAX_POS,
                                               "initializer_range": 0.1, **fields, **overrides})
    cfg.architectures = [model_cls]
    return cfg


def save_preset(out: Path, preset: tuple[str, str, dict], seed: int = 0, fused: bool = False,
                dtype: torch.dtype = torch.float64, **overrides) -> str:
    """transformers' own model on `preset` (random biases, norms and correction bias), saved in `dtype` with the
    tiny tokenizer; `fused`: experts as transformers 5 holds them (experts.gate_up_proj / down_proj)."""
    cfg = preset_config(preset, **overrides)
    return save_model(build_hf_model(cfg, seed), out, cfg, dtype, fused)


__all__ = ["CSA_RATE", "DSV4_TINY", "FP8_TINY", "GPT_OSS_YARN", "HCA_RATE", "HF_DSA", "HF_DSA_FP8", "HF_HYBRID",
           "HF_TINY", "INT4_TINY", "M2_TINY", "MAX_POS", "NVFP4_TINY", "VOCAB", "WINDOW", "build_dsv4_model",
           "build_hf_model", "dsv4_config", "gpt_oss_config", "hf_config", "m2_config", "preset_config",
           "save_dsv4_checkpoint", "save_gpt_oss", "save_hf_checkpoint", "save_m2_checkpoint", "save_model",
           "save_preset", "save_tokenizer"]
