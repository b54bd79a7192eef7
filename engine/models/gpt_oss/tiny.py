"""gpt-oss's tiny checkpoint: `moelink make-tiny-model --arch gpt_oss` and the test suite's
(tests/helpers/gpt_oss_checkpoints.py). Built by transformers' own GptOssForCausalLM (`save_pretrained`), every
parameter drawn here (`_gpt_oss_draw`)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import torch

from ...tools.tiny_families import MAX_POS, VOCAB, WINDOW, TinyArch, save_model

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


def _write(out: Path, *, seed: int, dtype: torch.dtype, fmt: str, overrides: Mapping) -> str:
    return save_gpt_oss(out, dtype, seed, **overrides)


# MXFP4 experts: their width a multiple of 32 (one scale per 32 values).
ARCHS = {
    "gpt_oss": TinyArch("GptOssForCausalLM", "gpt-oss-20b, gpt-oss-120b", ("float", "mxfp4"), write=_write,
                        expert_width="intermediate_size", format_fields={"mxfp4": {"intermediate_size": 32}}),
}

__all__ = ["ARCHS", "GPT_OSS_YARN", "gpt_oss_config", "save_gpt_oss"]
