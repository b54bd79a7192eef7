"""Tiny gpt-oss checkpoints built and saved by transformers itself (GptOssForCausalLM + `save_pretrained`).

The config exercises what gpt-oss adds: layer_types alternating sliding / full attention with a 6-token
window (so prompts of 1-40 tokens run past it), q/k/v/o biases, per-head sinks, a router bias, expert biases,
the clamped SwiGLU with a small swiglu_limit (0.6, so the clamps engage on these activations), YaRN rope with
`truncate: false`, GQA (4 heads over 2 kv heads), 5 experts (not a power of two), top-2.

Every parameter is drawn here (transformers initialises biases to 0, sinks with std 0.02): fan-in scaled
matrices, gains on router and head so routing and greedy tokens vary, noisy norms, biases of std 0.1, sinks
of std 1 (so they take a real share of the softmax).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

VOCAB, MAX_POS, WINDOW = 400, 512, 6
YARN = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": False, "original_max_position_embeddings": 64}


def gpt_oss_config(**overrides):
    import transformers

    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=5,
                  num_experts_per_tok=2, sliding_window=WINDOW, max_position_embeddings=MAX_POS,
                  swiglu_limit=0.6, rope_parameters=dict(YARN), rms_norm_eps=1e-5, tie_word_embeddings=False)
    fields.update(overrides)
    cfg = transformers.GptOssConfig(**fields)
    cfg.architectures = ["GptOssForCausalLM"]
    return cfg


def _draw(name: str, p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
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

    from moelink.engine.tools.tiny_corpus import train_tiny_tokenizer, write_tokenizer_configs

    cfg = gpt_oss_config(**overrides)
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(cfg).to(torch.float64)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_draw(name, p, gen))
    out = Path(out)
    model.to(dtype).save_pretrained(out)
    tok = train_tiny_tokenizer(VOCAB)
    tok.save(str(out / "tokenizer.json"))
    write_tokenizer_configs(out, tok, MAX_POS)
    return str(out)
