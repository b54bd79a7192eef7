"""DBRX's tiny checkpoint: `moelink make-tiny-model --arch dbrx` and the test suite's (tests/engine/test_dbrx.py).
Built by transformers' own DbrxForCausalLM; its LayerNorm weights, which transformers initialises to 1, drawn
(save_dbrx), so a norm loaded into the wrong place shows.

What the family adds at these sizes: GQA 4 / 2 from one fused Wqkv clamped at clip_qkv 1.0 (about a fifth of q, k
and v is clamped), LayerNorms without bias, top-2 of 6 experts renormalised, the experts stored fused (w1 / v1 / w2).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ...tools.tiny_families import Preset, TinyArch, preset_config, save_model

DBRX: Preset = ("DbrxConfig", "DbrxForCausalLM", dict(
    d_model=64, n_heads=4, n_layers=3, attn_config=dict(kv_n_heads=2, clip_qkv=1.0, rope_theta=10000.0),
    ffn_config=dict(ffn_hidden_size=16, moe_num_experts=6, moe_top_k=2), bos_token_id=None, eos_token_id=None,
    pad_token_id=None))


def save_dbrx(out: Path | str, preset: Preset = DBRX, seed: int = 0, dtype: torch.dtype = torch.float64,
              **overrides) -> str:
    """transformers' DbrxForCausalLM on `preset` (`overrides` on top) in float64, its LayerNorm weights drawn,
    saved in `dtype` with the tiny tokenizer."""
    import transformers

    cfg = preset_config(preset, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, cfg.architectures[0])(cfg).to(torch.float64)  # DbrxForCausalLM (lazy: mypy)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.add_(torch.randn(mod.weight.shape, generator=g, dtype=torch.float64) * 0.2)
    return save_model(model, Path(out), cfg, dtype)


def _write(out: Path, *, seed: int, dtype: torch.dtype, fmt: str, overrides: Mapping) -> object:
    return save_dbrx(out, DBRX, seed, dtype, **overrides)


ARCHS = {
    "dbrx": TinyArch("DbrxForCausalLM", "dbrx-base, dbrx-instruct", ("float",), write=_write,
                     expert_width="ffn_hidden_size"),
}

__all__ = ["ARCHS", "DBRX", "save_dbrx"]
