"""LongCat-Flash's tiny checkpoint: `moelink make-tiny-model --arch longcat_flash` and the test suite's
(tests/helpers/longcat_checkpoints.py), built by transformers' own classes (LongcatFlashConfig,
LongcatFlashForCausalLM).

Two layers (four sublayers: four MLA caches), MLA with q LoRA 16 and a latent of 16 (so the LoRA scales are 1.41,
not 1), interleaved rope; 6 routed experts and 2 zero-computation ones, top-3 (so many tokens pick an identity
expert), routed_scaling_factor 6 (the published model's); dense MLPs of 48. Constants transformers initialises (norm
weights, the correction bias) are drawn, so a weight loaded into the wrong place shows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ...tools.tiny_families import MAX_POS, VOCAB, TinyArch, save_model

ARCH = "LongcatFlashForCausalLM"
# The published prefixes (mtp.py reads them; this module's floor, engine/tools', cannot import it: the names test,
# tests/engine/test_spec_decode_mtp_families.py, checks that the two agree).
PREFIX = "model.mtp."
LAYER = PREFIX + "layers.0."
FIELDS = dict(
    hidden_size=32, ffn_hidden_size=48, num_layers=2, num_attention_heads=4, q_lora_rank=16, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=8, head_dim=8, v_head_dim=8, moe_topk=3, n_routed_experts=6, zero_expert_num=2,
    expert_ffn_hidden_size=16, routed_scaling_factor=6.0, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
    rms_norm_eps=1e-6, initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def tiny_config(vocab_size: int, max_position_embeddings: int, **overrides):
    """The tiny LongcatFlashConfig, `overrides` on top (any of its fields)."""
    from transformers import LongcatFlashConfig

    cfg = LongcatFlashConfig(vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                             **{**FIELDS, **overrides})
    cfg.architectures = [ARCH]
    return cfg


def tiny_model(cfg, seed: int = 0):
    """transformers' model of `cfg` in float64, norm weights and correction biases drawn (the biases in float32, as
    moelink holds them: transformers adds its copy to float32 softmax scores)."""
    from transformers import LongcatFlashForCausalLM

    torch.manual_seed(seed)
    model = LongcatFlashForCausalLM(cfg).to(torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
        for mod in model.modules():
            bias = getattr(mod, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_((torch.randn(bias.shape, generator=g) * 0.05).to(bias.dtype))
    return model


def write(out: Path, *, seed: int, dtype: torch.dtype, fmt: str, overrides: Mapping) -> str:
    """TinyArch.write: the tiny model with `overrides`, saved in `dtype` with the tiny tokenizer; with
    num_nextn_predict_layers=1 (config.json gets it) its MTP module too (`add_mtp_module`)."""
    cfg = tiny_config(VOCAB, MAX_POS, **overrides)
    path = save_model(tiny_model(cfg, seed), out, cfg, dtype)
    if getattr(cfg, "num_nextn_predict_layers", 0):
        add_mtp_module(path, seed=seed)
    return path


def add_mtp_module(out: str | Path, *, seed: int = 0) -> None:
    """Append one random MTP module, in the published names (engine/models/longcat_flash/mtp.py), to the tiny
    checkpoint in `out` (transformers neither builds nor saves it): `model.mtp.*` in mtp.safetensors, the inner layer
    shaped as main sublayer 0 (its norms, its MLA, its dense MLP), drawn from a stream of its own (the main weights
    stay as they were); norms around 1, matrices fan-in scaled."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ...tools.file_modes import umask_mode

    out = Path(out)
    if (out / "model.safetensors.index.json").exists():
        raise ValueError(f"add_mtp_module: {out} is sharded; the tiny writer appends to one model.safetensors only.")
    main: dict[str, torch.Tensor] = {}
    with safe_open(str(out / "model.safetensors"), framework="pt") as st:
        main = {n: st.get_tensor(n) for n in st.keys()}
    if any(n.startswith(PREFIX) for n in main):
        raise ValueError(f"add_mtp_module: {out} already holds {PREFIX}* tensors.")
    template = {PREFIX + "embed_tokens.weight": "model.embed_tokens.weight",
                LAYER + "enorm.m.weight": "model.norm.weight", LAYER + "hnorm.m.weight": "model.norm.weight",
                PREFIX + "norm.weight": "model.norm.weight",
                LAYER + "input_layernorm.weight": "model.layers.0.input_layernorm.0.weight",
                LAYER + "post_attention_layernorm.weight": "model.layers.0.post_attention_layernorm.0.weight"}
    for n in sorted(main):
        for src, dst in (("model.layers.0.self_attn.0.", "self_attn."), ("model.layers.0.mlps.0.", "transformer_layer.mlp.")):
            if n.startswith(src):
                template[LAYER + dst + n[len(src):]] = n
    gen = torch.Generator().manual_seed(seed + 7919)
    tensors: dict[str, torch.Tensor] = {}
    for name, src in sorted(template.items()):
        t = main[src]
        if t.dim() == 1:
            tensors[name] = (1 + 0.2 * torch.randn(t.shape, generator=gen, dtype=torch.float64)).to(t.dtype)
        else:
            tensors[name] = (torch.randn(t.shape, generator=gen, dtype=torch.float64) / t.shape[-1] ** 0.5).to(t.dtype)
    D, dt = main["model.norm.weight"].shape[0], main["model.norm.weight"].dtype
    tensors[LAYER + "eh_proj.weight"] = (torch.randn(D, 2 * D, generator=gen, dtype=torch.float64) / (2 * D) ** 0.5).to(dt)
    save_file(tensors, str(out / "mtp.safetensors"), metadata={"format": "pt"})
    umask_mode([out / "mtp.safetensors"])


# Float and FP8 (LongCat-Flash-Chat-FP8's format): the INT4 and NVFP4 writers would also quantize the
# zero-computation experts' unused gate / up rows.
ARCHS = {
    "longcat_flash": TinyArch(ARCH, "LongCat-Flash-Chat, LongCat-Flash-Thinking", ("float", "fp8"), write=write,
                              expert_width="expert_ffn_hidden_size"),
}

__all__ = ["ARCH", "ARCHS", "FIELDS", "add_mtp_module", "tiny_config", "tiny_model", "write"]
