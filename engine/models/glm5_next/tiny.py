"""GLM-5.3-Flash's tiny checkpoint: `moelink make-tiny-model --arch glm5_next` and the test suite's
(tests/engine/test_glm5_next.py), built by transformers' own classes (Glm5NextConfig,
Glm5NextForConditionalGeneration: the text model under model.language_model., a one-block vision tower beside it).

Six layers: Kimi Delta Attention on 0, 3, 5 (2 heads of 8, conv 4, the safe gate at -5), NoPE MLA with the pooled
DSA indexer on 1, 2, 4 (4 heads, q LoRA 16, latent 16, index_topk 8 in pools of 4: a query attends to 2 pools and
its own incomplete one, so prompts past 11 tokens are sparse; 16 index heads keep the relu'd scores apart), layer 2
sharing layer 1's selection; 4 hyper-connection streams; a dense first layer, then 8 routed experts in 2 groups
(top-2 of the best group) and a shared one. What transformers initialises to constants (norm weights, the correction
bias, the hyper-connections' base and scale, the forget gate's A_log, the indexer's pool table and gate) is drawn,
so a weight loaded into the wrong place shows. With num_nextn_predict_layers=1 its MTP layer too (mtp.py), in the
published names (model.language_model.layers.6.*) shaped as layer 4 (a full indexer, routed) with no hyper-connection
tensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ...tools.tiny_families import TinyArch, build_hf_model, preset_config, save_model, write_mtp_module

_TINY_VISION = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16, out_hidden_size=32, patch_size=4,
                    temporal_patch_size=2, spatial_merge_size=2)
PRESET = ("Glm5NextConfig", "Glm5NextForConditionalGeneration", dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, v_head_dim=12, moe_intermediate_size=16,
    n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2, n_shared_experts=1,
    index_topk=8, index_kpool=4, index_n_heads=16, index_head_dim=12, linear_num_heads=2, linear_head_dim=8,
    linear_conv_kernel_dim=4, hc_mult=4, pad_token_id=0, swiglu_limit=1.0,
    layer_types=["linear_attention", "indexed_attention", "indexed_attention", "linear_attention",
                 "indexed_attention", "linear_attention"],
    indexer_types=["full", "full", "shared", "full", "full", "full"],
    mlp_layer_types=["dense"] + ["sparse"] * 5, vision_config=_TINY_VISION))


def tiny_model(cfg, seed: int = 0):
    """transformers' model of `cfg` in float64 (build_hf_model draws the norms and correction bias), and the
    constants it leaves: hyper-connection base / scale, A_log, the indexer's pool table and gate."""
    model = build_hf_model(cfg, seed)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("_hc.base", "_hc.scale", "forget_gate.A_log", "index_kpool_compress_ape",
                              "index_kpool_compress_gate")):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
                        * (0.3 if name.endswith("gate") else 1.0))
    return model


def write(out: Path, *, seed: int, dtype: torch.dtype, fmt: str, overrides: Mapping) -> str:
    """TinyArch.write: the tiny model with `overrides` (text_config fields), saved in `dtype` with the tiny
    tokenizer; with num_nextn_predict_layers=1 its MTP layer, drawn (write_mtp_module), and the count in
    text_config."""
    n = overrides.get("num_nextn_predict_layers", 0)
    cfg = preset_config(PRESET, **{k: v for k, v in overrides.items() if k != "num_nextn_predict_layers"})
    path = save_model(tiny_model(cfg, seed), out, cfg, dtype)
    if n:
        text = cfg.text_config
        if n != 1:
            raise ValueError(f"num_nextn_predict_layers={n!r}: the tiny GLM-5.3-Flash writes one MTP layer (0 or 1).")
        p = "model.language_model.layers."
        write_mtp_module(out, f"{p}{text.num_hidden_layers - 2}.", f"{p}{text.num_hidden_layers}.",
                         {"enorm.weight": "norm", "hnorm.weight": "norm", "shared_head.norm.weight": "norm",
                          "eh_proj.weight": "eh_proj"}, seed=seed, skip=("hc_",), count_in="text_config")
    return path


ARCHS = {
    "glm5_next": TinyArch("Glm5NextForConditionalGeneration", "GLM-5.3-Flash as published (the text model of a "
                          "multimodal checkpoint)", ("float", "fp8"), write=write),
}

__all__ = ["ARCHS", "PRESET", "tiny_model", "write"]
