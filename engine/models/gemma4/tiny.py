"""Gemma 4's tiny checkpoints: `moelink make-tiny-model --arch gemma4` (the 26B-A4B's text layout) and
`gemma4_multimodal` (the published Gemma4ForConditionalGeneration layout), and the test suite's
(tests/engine/test_gemma4.py). Built by transformers' own Gemma4ForCausalLM (or Gemma4ForConditionalGeneration, a
one-layer vision tower beside the text model) with every constant transformers initialises to one drawn (the norm
weights, the router's scale and per-expert scale, each layer's layer_scalar), so a weight loaded into the wrong place
shows.

What the family adds at these sizes: sliding layers (window 8, head_dim 16, 2 kv heads, the default rope) between
full layers of twice the head width, one kv head whose values are k_proj's (attention_k_eq_v) and the proportional
rope (4 of 16 frequencies turning); q/k norms with weights, the weightless v norm, softmax scale 1; a dense MLP 48
wide beside top-2 of 6 experts 16 wide in every layer, GELU-tanh; the final logits softcapped at 3 (the tiny model's
logits reach it); the embedding scaled by sqrt(64).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ...tools.tiny_families import Preset, TinyArch, preset_config, save_model

_TEXT = dict(hidden_size=64, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
             num_global_key_value_heads=1, attention_k_eq_v=True, enable_moe_block=True, num_experts=6,
             top_k_experts=2, sliding_window=8,
             layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
             hidden_size_per_layer_input=0, num_kv_shared_layers=0, final_logit_softcapping=3.0,
             rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
GEMMA4: Preset = ("Gemma4TextConfig", "Gemma4ForCausalLM", dict(_TEXT))
_VISION = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=1, position_embedding_size=64)
# (pad_token_id 0: the wrapper replaces its media placeholders by it before the text model's embedding.)
GEMMA4_MULTIMODAL: Preset = ("Gemma4Config", "Gemma4ForConditionalGeneration",
                             dict(_TEXT, pad_token_id=0, vision_config=_VISION))


def save_gemma4(out: Path | str, preset: Preset = GEMMA4, seed: int = 0, dtype: torch.dtype = torch.float64,
                **overrides) -> str:
    """The preset built by transformers, its constants drawn (module docstring), saved in `dtype`."""
    import transformers

    cfg = preset_config(preset, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, cfg.architectures[0])(cfg).to(torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "language_model" not in name and not name.startswith("model.layers") and "norm" not in name:
                continue
            if name.endswith(("norm.weight", "_1.weight", "_2.weight", "router.scale")):
                t.add_(torch.randn(t.shape, generator=g, dtype=torch.float64) * 0.2)
            elif name.endswith(("per_expert_scale", "layer_scalar")):
                t.copy_(1.0 + torch.rand(t.shape, generator=g, dtype=torch.float64) * 0.5)
    return save_model(model, Path(out), cfg, dtype)


def _writer(preset: Preset):
    def write(out: Path, *, seed: int, dtype: torch.dtype, fmt: str, overrides) -> object:
        return save_gemma4(out, preset, seed, dtype, **overrides)

    return write


ARCHS = {
    "gemma4": TinyArch("Gemma4ForCausalLM", "google/gemma-4-26B-A4B's text model", ("float",),
                       write=_writer(GEMMA4)),
    "gemma4_multimodal": TinyArch("Gemma4ForConditionalGeneration", "google/gemma-4-26B-A4B(-it) as published (the "
                                  "text model under model.language_model., served text-only)", ("float",),
                                  write=_writer(GEMMA4_MULTIMODAL)),
}

__all__ = ["ARCHS", "GEMMA4", "GEMMA4_MULTIMODAL", "save_gemma4"]
