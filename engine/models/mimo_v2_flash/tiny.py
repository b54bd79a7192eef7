"""MiMo-V2-Flash's tiny checkpoint: `moelink make-tiny-model --arch mimo_v2_flash` and the test suite's
(tests/helpers/m2_checkpoints.py). Built by transformers' own MiMoV2FlashForCausalLM and drawn by
engine/tools/tiny_families.save_drawn_preset (norms, biases, sinks, the correction bias random)."""
from __future__ import annotations

import re

import torch

from ...tools.tiny_families import QUANT_FORMATS, WINDOW, Preset, TinyArch, preset_writer, published_as

# layer_types mixing full and sliding-window layers unequally, the sliding ones with twice the kv heads, sinks and a
# rope of their own, values narrower than q/k scaled by attention_value_scale, q/k/v biases, a dense first layer,
# DeepSeek-V3 routing over 8 experts in 2 groups, a 6-token window.
MIMO: Preset = ("MiMoV2FlashConfig", "MiMoV2FlashForCausalLM", dict(
    hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=5, num_attention_heads=4,
    num_key_value_heads=1, head_dim=24, v_head_dim=16, n_routed_experts=8, n_group=2, topk_group=1,
    num_experts_per_tok=2, sliding_window=WINDOW, attention_bias=True, attention_value_scale=0.707,
    layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention",
                 "sliding_attention"],
    mlp_layer_types=["dense", "sparse", "sparse", "sparse", "sparse"],
    rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.334},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5}},
    bos_token_id=None))



def fuse_qkv(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each layer's self_attn.{q,k,v}_proj.{weight,bias} as one self_attn.qkv_proj.{weight,bias} (rows q, k, v):
    MiMoV2ForCausalLM's layout (config.py)."""
    out = {n: t for n, t in tensors.items() if not re.search(r"\.self_attn\.[qkv]_proj\.", n)}
    for name in tensors:
        m = re.fullmatch(r"(.*\.self_attn\.)q_proj\.(weight|bias)", name)
        if m:
            p, kind = m.groups()
            out[f"{p}qkv_proj.{kind}"] = torch.cat([tensors[f"{p}{x}_proj.{kind}"] for x in "qkv"])
    return out


ARCHS = {
    "mimo_v2_flash": TinyArch("MiMoV2FlashForCausalLM", "MiMo-V2-Flash", ("float",) + QUANT_FORMATS,
                              write=preset_writer(MIMO, drawn=True)),
    # MiMo-V2-Flash as vLLM registers MiMo-V2 (MiMoV2ForCausalLM): q, k and v fused per layer.
    "mimo_v2": TinyArch("MiMoV2ForCausalLM", "MiMo-V2-Flash with fused q/k/v (vLLM's MiMoV2ForCausalLM)", ("float",),
                        write=published_as(preset_writer(MIMO, drawn=True), "MiMoV2ForCausalLM", rename=fuse_qkv)),
}

__all__ = ["ARCHS", "MIMO", "fuse_qkv"]
