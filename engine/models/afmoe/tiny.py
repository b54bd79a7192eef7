"""AFMoE's tiny checkpoint: `moelink make-tiny-model --arch afmoe` and the test suite's (tests/engine/test_afmoe.py).
Built by transformers' own AfmoeForCausalLM, saved by save_pretrained with the tiny tokenizer
(engine/tools/tiny_families.save_model), what it initialises to constants drawn: the norms, the expert bias (in
float32, as transformers keeps it) and the router, which AFMoE's _init_weights zeroes (every expert tied: routing
would test nothing), so a weight loaded into the wrong place shows.

What the family adds at these sizes: sliding (rotary, window 6) and full (NoPE) layers, every other one
(global_attn_every_n_layers 2), the sigmoid output gate, four norms a layer, muP's embedding scale, one dense layer
then top-2 of 8 (sigmoid, expert bias, renormalised, route_scale 2.0) beside one shared expert.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ...tools.tiny_families import WINDOW, Preset, TinyArch, preset_config, save_model

AFMOE: Preset = ("AfmoeConfig", "AfmoeForCausalLM", dict(
    hidden_size=64, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=4, num_dense_layers=1,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
    num_shared_experts=1, route_scale=2.0, global_attn_every_n_layers=2, sliding_window=WINDOW, mup_enabled=True,
    rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None))


def save_afmoe(out: Path | str, seed: int = 0, dtype: torch.dtype = torch.float64, fused: bool = False,
               **overrides) -> str:
    """AFMOE (`overrides` on its fields) built, drawn and saved (`fused`: in transformers 5's own names)."""
    import transformers

    cfg = preset_config(AFMOE, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, "AfmoeForCausalLM")(cfg).to(torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
            elif name.endswith("router.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
            elif name.endswith("expert_bias"):
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))
    return save_model(model, Path(out), cfg, dtype, fused)


def _write(out: Path, *, seed: int, dtype: torch.dtype, fmt: str, overrides: Mapping) -> object:
    return save_afmoe(out, seed, dtype, **overrides)


ARCHS = {
    "afmoe": TinyArch("AfmoeForCausalLM", "Trinity-Mini, Trinity-Nano, Trinity-Large (float)", ("float",),
                      write=_write),
}

__all__ = ["AFMOE", "ARCHS", "save_afmoe"]
