"""Each routing strategy equals transformers' own router module, weight for weight and id for id.

The oracle is the router class of the installed transformers (Qwen3-MoE, Mixtral, DeepSeek-V2 greedy and
group-limited greedy, DeepSeek-V3, GLM-4-MoE), built from a tiny config with our random gate weight
copied in, fed float64 hidden states. Our side computes the gate matmul the way MoELayer does
(`router.float32_logits`) and calls the strategy `make_router` picks. Logits are continuous random
numbers, so ties (where topk's choice is unspecified) do not occur.

Legend: T tokens, D hidden, E experts, K top-k.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelink.moe.router import (RouterConfig, SigmoidGroupLimitedRouter, SoftmaxGroupLimitedRouter,
                                SoftmaxTopKRouter, make_router)

transformers = pytest.importorskip("transformers")

T, D = 64, 32


def _inputs(E: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(T, D, generator=g, dtype=torch.float64)
    w_ED = 2.0 * torch.randn(E, D, generator=g, dtype=torch.float64) / D**0.5
    bias_E = 0.1 * torch.randn(E, generator=g, dtype=torch.float32)
    return x_TD, w_ED, bias_E


def _ours(router, x_TD, w_ED, bias_E=None):
    # As MoELayer.forward computes the gate.
    logits_TE = F.linear(x_TD.float(), w_ED.float()) if router.float32_logits else F.linear(x_TD, w_ED)
    return router(logits_TE, bias_E)


def _hf(module, x_TD, w_ED, bias_E=None):
    with torch.no_grad():
        module.weight.data = w_ED.clone()
        if bias_E is not None:
            module.e_score_correction_bias.copy_(bias_E)  # float32, as transformers keeps it
        _, weights_TK, ids_TK = module(x_TD)
    return weights_TK, ids_TK


def _assert_same(ours, theirs):
    """Same experts per token with bitwise-equal weights; the order within a row may differ (sorted=False)."""
    (w, ids), (w_hf, ids_hf) = ours, theirs
    assert w.dtype == torch.float32 and ids.dtype == torch.int64
    order, order_hf = ids.argsort(dim=-1), ids_hf.argsort(dim=-1)
    assert torch.equal(ids.gather(1, order), ids_hf.gather(1, order_hf))
    assert torch.equal(w.double().gather(1, order), w_hf.double().gather(1, order_hf))


@pytest.mark.parametrize("E,K,norm", [(8, 2, True), (12, 3, False), (6, 3, True)])
def test_qwen3_moe(E, K, norm):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeConfig, Qwen3MoeTopKRouter

    hf = Qwen3MoeTopKRouter(Qwen3MoeConfig(hidden_size=D, num_experts=E, num_experts_per_tok=K, norm_topk_prob=norm))
    router = make_router(RouterConfig(E, K, norm_topk_prob=norm))
    assert type(router) is SoftmaxTopKRouter and not router.float32_logits
    x, w, _ = _inputs(E, seed=E + K)
    _assert_same(_ours(router, x, w), _hf(hf, x, w))


@pytest.mark.parametrize("E,K", [(8, 2), (5, 3)])
def test_mixtral(E, K):
    from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralTopKRouter

    hf = MixtralTopKRouter(MixtralConfig(hidden_size=D, num_local_experts=E, num_experts_per_tok=K))
    x, w, _ = _inputs(E, seed=E)
    _assert_same(_ours(make_router(RouterConfig(E, K, norm_topk_prob=True)), x, w), _hf(hf, x, w))


# (experts, groups, groups kept, top-k): non-power-of-two experts, groups of 3, a single group, all kept.
GROUPS = [(12, 4, 2, 3), (12, 3, 1, 4), (12, 6, 4, 5), (16, 8, 3, 6), (8, 1, 1, 2), (12, 4, 4, 4)]


@pytest.mark.parametrize("E,G,TG,K", GROUPS)
@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_deepseek_v2(E, G, TG, K, method):
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Config, DeepseekV2TopkRouter

    scale = 16.0
    hf = DeepseekV2TopkRouter(DeepseekV2Config(
        hidden_size=D, num_attention_heads=4, n_routed_experts=E, num_experts_per_tok=K, n_group=G,
        topk_group=TG, topk_method=method, routed_scaling_factor=scale))
    cfg = RouterConfig(E, K, "softmax", method, G, TG, norm_topk_prob=False, routed_scaling_factor=scale,
                       float32_logits=True)
    router = make_router(cfg)
    assert type(router) is (SoftmaxTopKRouter if method == "greedy" else SoftmaxGroupLimitedRouter)
    x, w, _ = _inputs(E, seed=E * G + TG)
    _assert_same(_ours(router, x, w), _hf(hf, x, w))


@pytest.mark.parametrize("E,G,TG,K", GROUPS)
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_sigmoid_noaux_tc(E, G, TG, K, norm, family):
    if family == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Config as Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter as HFRouter
    else:
        from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeConfig as Config
        from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter as HFRouter
    scale = 2.5
    hf = HFRouter(Config(hidden_size=D, num_attention_heads=4, n_routed_experts=E, num_experts_per_tok=K,
                         n_group=G, topk_group=TG, norm_topk_prob=norm, routed_scaling_factor=scale))
    router = make_router(RouterConfig(E, K, "sigmoid", "noaux_tc", G, TG, norm, scale, float32_logits=True))
    assert type(router) is SigmoidGroupLimitedRouter and router.needs_bias
    x, w, bias = _inputs(E, seed=E * G + TG + norm)
    ours = _ours(router, x, w, bias)
    _assert_same(ours, _hf(hf, x, w, bias))
    # The bias changed the choice for some tokens (else this test would not see where it is applied).
    assert not torch.equal(ours[1].sort().values, _ours(router, x, w)[1].sort().values) or TG == G == 1


def test_bias_selects_but_does_not_weigh():
    """A large bias forces expert 5 into every top-k, yet its weight is its unbiased sigmoid score."""
    E, K = 8, 2
    router = make_router(RouterConfig(E, K, "sigmoid", "noaux_tc", norm_topk_prob=False))
    logits = torch.randn(16, E, generator=torch.Generator().manual_seed(0))
    bias = torch.zeros(E)
    bias[5] = 100.0
    w, ids = router(logits, bias)
    assert (ids == 5).any(dim=-1).all()
    torch.testing.assert_close(w, torch.sigmoid(logits).gather(1, ids), rtol=0, atol=0)


def test_no_tokens():
    for router in (make_router(RouterConfig(12, 3, "sigmoid", "noaux_tc", 4, 2)),
                   make_router(RouterConfig(12, 3, "softmax", "group_limited_greedy", 4, 2, False))):
        w, ids = router(torch.zeros(0, 12), torch.zeros(12) if router.needs_bias else None)
        assert w.shape == ids.shape == (0, 3)


def test_bias_refused_by_a_router_without_one():
    with pytest.raises(ValueError, match="takes no e_score_correction_bias"):
        make_router(RouterConfig(4, 2))(torch.zeros(3, 4), torch.zeros(4))


@pytest.mark.parametrize("kwargs,match", [
    (dict(scoring_func="tanh"), r"scoring_func='tanh' is not supported: choose from softmax, sigmoid"),
    (dict(topk_method="expert_choice"), r"topk_method='expert_choice' is not supported: with scoring_func='softmax' choose "
                                       r"from greedy, group_limited_greedy, topk_softmax, noaux_tc, sparsemixer"),
    (dict(topk_method="sparsemixer"), r"num_experts_per_tok=3 is not supported: SparseMixer routing \(PhiMoE\) picks "
                                     r"exactly 2 experts"),
    (dict(scoring_func="sigmoid", topk_method="greedy"), r"topk_method='greedy' .* choose from noaux_tc"),
    (dict(topk_method="group_limited_greedy", n_group=5), r"n_group=5 .* divides the 12 routed experts"),
    (dict(topk_method="group_limited_greedy", n_group=4, topk_group=5), r"topk_group=5 .* \[1, n_group=4\]"),
    (dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=12), r"n_group=12 .* top-2"),
    (dict(topk_method="group_limited_greedy", n_group=4, topk_group=1, top_k=4),
     r"num_experts_per_tok=4 .* <= the 3 experts of the topk_group=1 chosen groups"),
    (dict(top_k=13), r"num_experts_per_tok=13 .* \[1, 12\]"),
    (dict(routed_scaling_factor=0.0), r"routed_scaling_factor=0.0 .* finite number > 0"),
    (dict(norm_topk_prob="yes"), r"norm_topk_prob='yes'"),
])
def test_bad_configs_name_the_field(kwargs, match):
    args = dict(num_experts=12, top_k=3) | kwargs
    with pytest.raises(ValueError, match=r"config\.json " + match):
        RouterConfig(**args)


def test_greedy_ignores_group_fields():
    # DeepSeek-V2 "greedy" configs carry n_group / topk_group that transformers does not read.
    cfg = RouterConfig(12, 3, "softmax", "greedy", n_group=5, topk_group=7)
    assert type(make_router(cfg)) is SoftmaxTopKRouter
