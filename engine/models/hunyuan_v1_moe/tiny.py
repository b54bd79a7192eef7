"""HunYuan-MoE-V1's tiny checkpoint: `moelink make-tiny-model --arch hunyuan_v1_moe` and the test suite's
(tests/engine/test_hunyuan_v1_moe.py). Built by transformers' own HunYuanMoEV1ForCausalLM and drawn by
engine/tools/tiny_families.save_drawn_preset (the q/k norm weights random, so a norm before the rotary, or one loaded
into the wrong place, shows).

What the family adds at these sizes: the q/k norm after the rotary with GQA 4 / 2, the published rope (rope_type
"dynamic" with a fixed alpha, a larger base), moe_topk as a list (one per layer, as Hunyuan-A13B publishes it), top-2
of 6 experts renormalised beside an ungated shared MLP in every layer.
"""
from __future__ import annotations

from ...tools.tiny_families import QUANT_FORMATS, Preset, TinyArch, preset_writer

HUNYUAN_V1_MOE: Preset = ("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", dict(
    hidden_size=64, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, num_experts=6, moe_topk=[2, 2, 2], rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "dynamic", "alpha": 50.0, "factor": 1.0, "rope_theta": 10000.0},
    bos_token_id=None, eos_token_id=None, pad_token_id=None, eod_token_id=None, sep_token_id=None))

ARCHS = {
    "hunyuan_v1_moe": TinyArch("HunYuanMoEV1ForCausalLM", "Hunyuan-A13B(-Instruct)", ("float",) + QUANT_FORMATS,
                               write=preset_writer(HUNYUAN_V1_MOE, drawn=True), expert_width="intermediate_size"),
}

__all__ = ["ARCHS", "HUNYUAN_V1_MOE"]
