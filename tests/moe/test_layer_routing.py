"""MoELayer with a DeepSeek-V3 router equals transformers' routed experts (gate + experts, no shared ones).

This checks what the router unit tests cannot: that the layer runs the gate matmul in float32 and hands
the router its e_score_correction_bias (held in float32 whatever the model dtype).

Legend: T tokens, D hidden, E experts, I expert width.
"""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.ops import ReferenceKernels
from moelink.moe.layer import MoELayer
from moelink.moe.router import RouterConfig, make_router

pytest.importorskip("transformers")


def test_moe_layer_matches_deepseek_v3_routed_experts():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (DeepseekV3Config, DeepseekV3Experts,
                                                                       DeepseekV3TopkRouter)

    T, D, E, I, K, G, TG = 40, 32, 12, 16, 3, 4, 2
    cfg = DeepseekV3Config(hidden_size=D, num_attention_heads=4, n_routed_experts=E, moe_intermediate_size=I,
                           num_experts_per_tok=K, n_group=G, topk_group=TG, routed_scaling_factor=2.5)
    cfg._experts_implementation = "eager"
    gate, experts = DeepseekV3TopkRouter(cfg), DeepseekV3Experts(cfg).double()
    g = torch.Generator().manual_seed(0)
    router = make_router(RouterConfig(E, K, "sigmoid", "noaux_tc", G, TG, True, 2.5, float32_logits=True))
    layer = MoELayer(D, I, E, router, ReferenceKernels(), torch.float64)
    assert layer.e_score_correction_bias_G.dtype == torch.float32
    with torch.no_grad():
        for ours, theirs, std in ((layer.gate_GD, gate.weight, 2.0 / D**0.5),
                                  (layer.w13_EFD, experts.gate_up_proj, 1.0 / D**0.5),
                                  (layer.w2_EDI, experts.down_proj, 1.0 / I**0.5)):
            w = std * torch.randn(ours.shape, generator=g, dtype=torch.float64)
            ours.copy_(w)
            theirs.data = w.clone()
        bias = 0.1 * torch.randn(E, generator=g, dtype=torch.float32)
        layer.e_score_correction_bias_G.copy_(bias)
        gate.e_score_correction_bias.copy_(bias)
        x_TD = torch.randn(T, D, generator=g, dtype=torch.float64)
        _, w_TK, ids_TK = gate(x_TD)
        want_TD = experts(x_TD, ids_TK, w_TK)
        got_TD = layer(x_TD)
    torch.testing.assert_close(got_TD, want_TD, rtol=1e-12, atol=1e-12)
