"""PhiMoE's tiny checkpoint: `moelink make-tiny-model --arch phimoe` and the test suite's (tests/engine/
test_phimoe.py). Built by transformers' own PhimoeForCausalLM and drawn by engine/tools/tiny_families.
save_drawn_preset (the LayerNorms' weights and every bias random: q/k/v/o, the norms', the LM head's); `--arch
phi35_moe` is the same checkpoint named as the release names itself (PhiMoEForCausalLM).

What the family adds at these sizes: SparseMixer routing over 6 experts with a jitter of 0.5, so each pick's
softmax keeps some experts and leaves others out (the published 0.01 leaves out nearly all: the tests also run
it); LayerNorms with biases; attention and LM head biases.
"""
from __future__ import annotations

from ...tools.tiny_families import Preset, TinyArch, preset_writer, published_as

PHIMOE: Preset = ("PhimoeConfig", "PhimoeForCausalLM", dict(
    hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    num_local_experts=6, num_experts_per_tok=2, router_jitter_noise=0.5, attention_bias=True, lm_head_bias=True,
    rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=None,
    eos_token_id=None, pad_token_id=None))

# Phi-3.5-MoE's rope as published, at these sizes: longrope with a factor per frequency (8 for the 16-wide heads),
# its two mscales equal (the release's 1.2431...), original_max_position_embeddings 32 (the release's 4096) so that
# short prompts cross it.
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.1, 1.3, 1.7, 2.2, 3.1, 4.5, 6.0],
            "long_factor": [1.0, 1.5, 2.5, 4.0, 7.0, 11.0, 17.0, 25.0], "short_mscale": 1.243163121016122,
            "long_mscale": 1.243163121016122, "original_max_position_embeddings": 32}
PHI35_MOE: Preset = (PHIMOE[0], PHIMOE[1], dict(PHIMOE[2], rope_parameters=LONGROPE))

ARCHS = {
    "phimoe": TinyArch("PhimoeForCausalLM", "Phi-3.5-MoE (transformers' class name)", ("float",),
                       write=preset_writer(PHIMOE, drawn=True)),
    # As Phi-3.5-MoE is published: the name its config.json (and vLLM) give it, its longrope.
    "phi35_moe": TinyArch("PhiMoEForCausalLM", "Phi-3.5-MoE as published (longrope)", ("float",),
                          write=published_as(preset_writer(PHI35_MOE, drawn=True), "PhiMoEForCausalLM")),
}

__all__ = ["ARCHS", "LONGROPE", "PHI35_MOE", "PHIMOE"]
