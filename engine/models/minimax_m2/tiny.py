"""MiniMax-M2's tiny checkpoint: `moelink make-tiny-model --arch minimax_m2` and the test suite's
(tests/helpers/m2_checkpoints.py). Built by transformers' own MiniMaxM2ForCausalLM and drawn by
engine/tools/tiny_families.save_drawn_preset (norms, the correction bias random)."""
from __future__ import annotations

from ...tools.tiny_families import QUANT_FORMATS, Preset, TinyArch, preset_writer

# q/k RMSNorm over all heads at once (noisy so a per-head norm would differ), a quarter of each head rotated, GQA
# 4 / 2, sigmoid routing over 6 experts with a correction bias beside the router, Mixtral's expert names, every layer
# routed.
MINIMAX: Preset = ("MiniMaxM2Config", "MiniMaxM2ForCausalLM", dict(
    hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, rotary_dim=4, num_local_experts=6, num_experts_per_tok=2, rope_theta=10000.0,
    bos_token_id=None, eos_token_id=None))

ARCHS = {
    "minimax_m2": TinyArch("MiniMaxM2ForCausalLM", "MiniMax-M2, M2.1", ("float",) + QUANT_FORMATS,
                           write=preset_writer(MINIMAX, drawn=True), expert_width="intermediate_size"),
}

__all__ = ["ARCHS", "MINIMAX"]
