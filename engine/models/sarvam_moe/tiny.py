"""Sarvam-MoE's tiny checkpoint: `moelink make-tiny-model --arch sarvam_moe` and the test suite's
(tests/engine/test_sarvam_moe.py). Built by transformers' own model for a SarvamMoEConfig (Glm4MoeForCausalLM), its
constants drawn by engine/tools/tiny_families.save_drawn_preset, saved in the published names (transformers'
conversion writes them back: word_embeddings, attention.query_key_value, attention.dense, query_layernorm /
key_layernorm, mlp.gate.expert_bias), config.json's architectures the published SarvamMoEForCausalLM.

What the family adds at these sizes: q/k/v fused in one tensor with their biases (use_qkv_bias) and GQA 4 / 2, the
per-head q/k norm, one leading dense layer, DeepSeek-V3's routing (top-2 of 8 in 2 groups, 1 kept, renormalised,
times 2.5) beside one shared expert.
"""
from __future__ import annotations

from pathlib import Path

from ...tools.tiny_families import Preset, TinyArch, preset_writer, published_as, save_drawn_preset

SARVAM_MOE: Preset = ("SarvamMoEConfig", "Glm4MoeForCausalLM", dict(
    hidden_size=64, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
    n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5, attention_bias=True,
    use_qk_norm=True, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    bos_token_id=None, eos_token_id=None, pad_token_id=None))

_WRITE = published_as(preset_writer(SARVAM_MOE, drawn=True), "SarvamMoEForCausalLM")


def save_sarvam_moe(out: Path | str, seed: int = 0, fused: bool = False, **overrides) -> str:
    """The preset saved in float64 as published (`fused`: in transformers 5's own names, experts fused, q/k/v apart),
    its config.json naming SarvamMoEForCausalLM."""
    import torch

    if fused:
        write = published_as(lambda o, **kw: save_drawn_preset(o, SARVAM_MOE, kw["seed"], dtype=kw["dtype"], fused=True,
                                                               **kw["overrides"]), "SarvamMoEForCausalLM")
    else:
        write = _WRITE
    write(Path(out), seed=seed, dtype=torch.float64, fmt="float", overrides=overrides)
    return str(out)


ARCHS = {
    "sarvam_moe": TinyArch("SarvamMoEForCausalLM", "sarvam-30b", ("float",), write=_WRITE),
}

__all__ = ["ARCHS", "SARVAM_MOE", "save_sarvam_moe"]
