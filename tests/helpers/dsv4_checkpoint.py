"""A tiny DeepSeek-V4 checkpoint built and saved by transformers itself (DeepseekV4ForCausalLM, float64).

Small enough to run in a test, shaped so every V4 part is exercised by prompts of 1..150 tokens: one layer of each
attention kind (sliding only, compressed sparse attention at rate 2 with an indexer top-4 (16 index heads keep exact ties of the index scores, a key every head scores 0, out of the top-k boundary), heavily compressed
attention at rate 8), a window of 6 tokens (shorter than most prompts), three hyper-connection streams, two
hash-routed MoE layers with a random token-id table, sqrtsoftplus routing with a correction bias after them, a shared
expert, and SwiGLU clamped at a limit the random weights reach. What transformers initialises to constants (sinks,
position biases, the hyper-connection bases and scales, norms, the correction bias, the hash table) is randomised, so
a weight loaded into the wrong place shows.
"""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB, MAX_POS = 400, 512
# Compress rates of the tiny config: the block size of the engine's cache must be a multiple of both.
CSA_RATE, HCA_RATE = 2, 8

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
    """transformers' DeepseekV4ForCausalLM in float64, with what it initialises to constants randomised."""
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
            elif name.endswith("tid2eid"):  # each token's k distinct experts, at random
                E = cfg.n_routed_experts
                b.copy_(torch.stack([torch.randperm(E, generator=g)[: b.shape[1]] for _ in range(b.shape[0])]))
    return model


def _save_tokenizer(out: Path) -> None:
    from moelink.engine.tools.tiny_corpus import train_tiny_tokenizer, write_tokenizer_configs

    tok = train_tiny_tokenizer(VOCAB)
    tok.save(str(out / "tokenizer.json"))
    write_tokenizer_configs(out, tok, MAX_POS)


def save_dsv4_checkpoint(out: Path, seed: int = 0, **overrides) -> str:
    """Build the tiny V4 with transformers, randomise what it initialises to constants, save it + a tokenizer."""
    cfg = dsv4_config(**overrides)
    model = build_dsv4_model(cfg, seed)
    out = Path(out)
    model.save_pretrained(out)
    _save_tokenizer(out)
    return str(out)
