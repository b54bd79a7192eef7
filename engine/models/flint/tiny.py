"""Flint's tiny checkpoint: `moelink make-tiny-model --arch flint` and the test suite's (tests/engine/test_flint.py).
Built by transformers' own FlintForCausalLM and drawn by engine/tools/tiny_families.save_drawn_preset (the norms and
the sinks random; the router, which transformers zeroes, drawn here: every expert would tie).

What the family adds at these sizes: full (NoPE) layers 0, 1 and 4 and sliding (rotary, window 6) layers 2 and 3,
as its config's default rule places them, a sink per head, layer 0 dense (mlp_only_layers), top-2 of 8 by sigmoid
renormalised beside an ungated shared expert.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ...tools.tiny_families import WINDOW, Preset, TinyArch, preset_config, save_model

FLINT: Preset = ("FlintConfig", "FlintForCausalLM", dict(
    hidden_size=64, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=32,
    num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
    num_experts_per_tok=2, mlp_only_layers=[0], sliding_window=WINDOW, rms_norm_eps=1e-6, bos_token_id=None,
    eos_token_id=None, pad_token_id=None))


def save_flint(out: Path | str, seed: int = 0, dtype: torch.dtype = torch.float64, fused: bool = False,
               **overrides) -> str:
    """FLINT (`overrides` on its fields) built, drawn and saved (`fused`: in transformers 5's own names)."""
    import transformers

    cfg = preset_config(FLINT, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, "FlintForCausalLM")(cfg).to(torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1)
            elif name.endswith("sinks") or name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * (1.0 if name.endswith("sinks")
                                                                                  else 0.3))
    return save_model(model, Path(out), cfg, dtype, fused)


def _write(out: Path, *, seed: int, dtype: torch.dtype, fmt: str, overrides: Mapping) -> object:
    return save_flint(out, seed, dtype, **overrides)


ARCHS = {
    "flint": TinyArch("FlintForCausalLM", "Flint (float)", ("float",), write=_write),
}

__all__ = ["ARCHS", "FLINT", "save_flint"]
