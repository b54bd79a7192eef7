"""Tiny Qwen3-MoE and DeepSeek-V3 checkpoints for the FP8 tests, built and saved (float64) by transformers.

Shapes are chosen for FP8 blocks of 16 x 16 (BLOCK): every stacked piece starts on a block boundary (q 64 /
k 32 / v 32; MLA's q_a 32 then kv_a 40; gate / up 16, 48), as in the published checkpoints, while ragged
blocks occur too: hidden 40 (= 2.5 blocks: every K of a hidden-input linear and every N of an output one),
MLA's kv_a 40 rows, and 6 experts (EP 2 splits them 3 + 3 contiguous rows). DeepSeek-V3's interleaved rope keeps
each head's de-interleaved rope rows (8 of its 16) inside one block, as 64-row rope parts do in 128 blocks.
"""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB, MAX_POS = 400, 512
BLOCK = (16, 16)

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
}


def save_fp8_tiny(out: Path, name: str, seed: int = 0, fused: bool = False) -> str:
    """transformers' own model on FP8_TINY[name], random norms / biases / correction bias, saved float64 with
    the tiny tokenizer; `fused`: experts as transformers 5 holds them (experts.gate_up_proj / down_proj)."""
    import transformers

    from moelink.engine.tiny_corpus import train_tiny_tokenizer, write_tokenizer_configs

    config_cls, model_cls, fields = FP8_TINY[name]
    cfg = getattr(transformers, config_cls)(vocab_size=VOCAB, max_position_embeddings=MAX_POS, initializer_range=0.1,
                                             **fields)
    cfg.architectures = [model_cls]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).to(torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in model.modules():
            if type(mod).__name__.endswith("RMSNorm"):
                mod.weight.add_(torch.randn(mod.weight.shape, generator=g, dtype=torch.float64) * 0.1)
            bias = getattr(mod, "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_(torch.randn(bias.shape, generator=g, dtype=bias.dtype) * 0.05)
    out = Path(out)
    model.save_pretrained(out, **({"save_original_format": False} if fused else {}))
    tok = train_tiny_tokenizer(VOCAB)
    tok.save(str(out / "tokenizer.json"))
    write_tokenizer_configs(out, tok, MAX_POS)
    return str(out)
