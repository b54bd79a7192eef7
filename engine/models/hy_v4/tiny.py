"""Hunyuan Hy4's tiny checkpoint: `moelink make-tiny-model --arch hy_v4` and the test suite's
(tests/engine/test_hy_v4.py), built by transformers' own classes (HYV4Config, HYV4ForCausalLM) and written by its
save_pretrained (Tencent's published names: hc_pre.*, linear_gate, learnable_sink_param; the routed experts fused).

Four layers: indexer_types full, full, shared, shared (transformers' default pattern: two layers in a row reuse a
selection) and mlp_layer_types dense, sparse, sparse, sparse; MLA with q LoRA 16, a latent of 16, 8 rope dims; the
indexer's 16 heads of 12 (its rope on the last 8 of each), index_topk 12, so prompts of 1-150 tokens attend sparsely
(16 heads keep exact ties of the index scores, a key every head's ReLU zeroes, off the top-k boundary: HF_DSA's
note); 4 hyper-connection streams with hc_magnitude 1.5; 10 experts, top-3, one shared, the SwiGLU clamped at 0.5 (a
limit the tiny activations cross). Constants transformers initialises (norm weights, the indexer's LayerNorm, the
correction bias: tiny_families._randomize_constants; the sinks and the hyper-connections' scales and biases here) are
drawn, so a weight loaded into the wrong place shows. With num_nextn_predict_layers=1 its MTP module too (mtp.py), in
the published names (model.mtp_layers.0.*) shaped as layer 1 (a full indexer, routed) with no hyper-connection
tensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ...tools.tiny_families import MAX_POS, VOCAB, TinyArch, build_hf_model, save_model, write_mtp_module

ARCH = "HYV4ForCausalLM"
MTP_PREFIX = "model.mtp_layers.0."  # mtp.PREFIX (a tool does not import the model: tests check the two agree)
FIELDS = dict(
    hidden_size=48, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
    q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, n_routed_experts=10,
    num_experts_per_tok=3, n_shared_experts=1, index_topk=12, index_n_heads=16, index_head_dim=12, hc_mult=4,
    hc_magnitude=1.5, swiglu_limit=0.5, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
    initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def tiny_config(vocab_size: int = VOCAB, max_position_embeddings: int = MAX_POS, **overrides):
    """The tiny HYV4Config, `overrides` on top (any of its fields)."""
    from transformers import HYV4Config

    cfg = HYV4Config(vocab_size=vocab_size, max_position_embeddings=max_position_embeddings, **{**FIELDS, **overrides})
    cfg.architectures = [ARCH]
    return cfg


def tiny_model(cfg, seed: int = 0):
    """transformers' model of `cfg` in float64, its constants drawn (module docstring)."""
    model = build_hf_model(cfg, seed)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".sinks"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
            elif name.endswith(("_hc.scale", "hc_head.hc_scale")):
                p.copy_(0.5 + torch.rand(p.shape, generator=g, dtype=torch.float64))
            elif name.endswith(("_hc.base", "hc_head.hc_base")):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return model


def write(out: Path, *, seed: int, dtype: torch.dtype, fmt: str, overrides: Mapping) -> str:
    """TinyArch.write: the tiny model with `overrides`, saved in `dtype` with the tiny tokenizer; with
    num_nextn_predict_layers=1 its MTP module, drawn (write_mtp_module), and the count in config.json."""
    n = overrides.get("num_nextn_predict_layers", 0)
    cfg = tiny_config(VOCAB, MAX_POS, **{k: v for k, v in overrides.items() if k != "num_nextn_predict_layers"})
    path = save_model(tiny_model(cfg, seed), out, cfg, dtype)
    if n:
        if n != 1:
            raise ValueError(f"num_nextn_predict_layers={n!r}: the tiny Hy4 writes one MTP module (0 or 1).")
        # The template: a layer that runs an indexer of its own and routed experts, as the module does.
        j = next(i for i, (it, mt) in enumerate(zip(cfg.indexer_types, cfg.mlp_layer_types))
                 if it == "full" and mt == "sparse")
        write_mtp_module(out, f"model.layers.{j}.", MTP_PREFIX,
                         {"enorm.weight": "norm", "hnorm.weight": "norm", "final_layernorm.weight": "norm",
                          "eh_proj.weight": "eh_proj"}, seed=seed, skip=("hc_pre.",))
    return path


ARCHS = {
    # FP8 (Hy4-preview-FP8): the indexer's heads one 16-row block each (the rope rows move within their block).
    "hy_v4": TinyArch(ARCH, "Hy4 preview, Hy4 preview-FP8", ("float", "fp8"), write=write,
                      format_fields={"fp8": {"index_head_dim": 16}}),
}

__all__ = ["ARCH", "ARCHS", "FIELDS", "MTP_PREFIX", "tiny_config", "tiny_model", "write"]
