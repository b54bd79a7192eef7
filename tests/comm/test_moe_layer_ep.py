"""`MoELayer.forward` under expert parallelism on real gloo ranks equals one MoELayer holding every expert.

Each rank builds the layer the way a worker does (its own experts' weights,
ExpertParallel over a gloo group) and runs router → dispatch → local experts →
combine on its own tokens. Oracle: a single-process MoELayer over all G
experts, same gate and weights, run on that rank's tokens, float64. Token
counts are ragged with an empty rank; placements cover a replica (EP 2),
default redundant slots and a hot expert copied onto every rank (EP 3), on
the exact ("torch") and padded ("torch_padded") layouts. The expert-load
counts the layer records must add up, over ranks, to the oracle's.
"""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.ops import ReferenceKernels
from moelink.moe.layer import MoELayer
from moelink.moe.placement import ExpertPlacement
from moelink.moe.router import SoftmaxTopKRouter
from moelink.moe.stats import MoEStats

HIDDEN, INTER = 16, 8
BACKENDS = ("torch", "torch_padded")

# name: (placement kwargs, tokens per rank, top-k, renormalize, hot expert or None)
CASES = {
    2: {
        "e4k2_rank1_empty": (dict(num_experts=4, ep_size=2), [6, 0], 2, True, None),
        "e5k3_replica": (dict(num_experts=5, ep_size=2, replicas=[0]), [3, 8], 3, False, 0),
    },
    3: {
        "e6k2_default_redundant": (dict(num_experts=6, ep_size=3, num_redundant=3), [0, 7, 4], 2, True, None),
        # Expert 1 on all three ranks ([0 1] [2 1] [3 1]) and routed to by every token.
        "e4k2_hot_everywhere": (dict(num_experts=4, ep_size=3, replicas=[1, 1]), [5, 1, 0], 2, True, 1),
    },
}


def _build(world_size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    scenarios, inputs = [], {}
    for name, (pkw, tokens, top_k, renormalize, hot) in CASES[world_size].items():
        G = pkw["num_experts"]
        gate = torch.randn(G, HIDDEN, generator=g, dtype=torch.float64)
        w13 = torch.randn(G, 2 * INTER, HIDDEN, generator=g, dtype=torch.float64) / HIDDEN**0.5
        w2 = torch.randn(G, HIDDEN, INTER, generator=g, dtype=torch.float64) / INTER**0.5
        xs = [torch.randn(T, HIDDEN, generator=g, dtype=torch.float64) for T in tokens]
        if hot is not None:
            # Feature 0 is large and only the hot expert's gate reads it: every token picks that expert.
            gate[:, 0] = 0.0
            gate[hot, 0] = 4.0
            for x in xs:
                x[:, 0] = 4.0
        inputs[name] = dict(placement=pkw, gate=gate, w13=w13, w2=w2, x=xs, top_k=top_k, renormalize=renormalize)
        for backend in BACKENDS:
            # Capacity above the largest rank's tokens: padding slots must stay out of the result too.
            options = dict(max_tokens_per_rank=max(tokens) + 2) if backend == "torch_padded" else {}
            scenarios.append(dict(name=f"{name}/{backend}", backend=backend, options=options, **inputs[name]))
    return scenarios, inputs


@pytest.fixture(scope="module")
def launched(ep_launch):
    """EP=2 and EP=3 groups, run at the same time."""
    scenarios2, inputs2 = _build(2, seed=3)
    scenarios3, inputs3 = _build(3, seed=4)
    res2, res3 = ep_launch(dict(world_size=2, scenarios=scenarios2, mode="layer"),
                           dict(world_size=3, scenarios=scenarios3, mode="layer"), timeout_s=180)
    return {2: (res2, inputs2), 3: (res3, inputs3)}


def _single_rank(inp: dict, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: one MoELayer over all experts, no EP. Returns (out_TD, routed pairs per expert [G])."""
    G = inp["gate"].shape[0]
    stats = MoEStats(1, G, torch.device("cpu"))
    layer = MoELayer(HIDDEN, INTER, G, SoftmaxTopKRouter(inp["top_k"], inp["renormalize"]), ReferenceKernels(),
                     torch.float64, stats=stats)
    layer.gate_GD.copy_(inp["gate"])
    layer.w13_EFD.copy_(inp["w13"])
    layer.w2_EDI.copy_(inp["w2"])
    out = layer(x_TD)
    return out, torch.from_numpy(stats.snapshot().tokens_per_expert[0])


@pytest.mark.parametrize("world_size, name", [(w, n) for w in CASES for n in CASES[w]])
@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_layer_under_ep_matches_one_rank(launched, world_size, name, backend):
    results, inputs = launched[world_size]
    inp = inputs[name]
    placement = ExpertPlacement(**inp["placement"])
    load_G = torch.zeros(placement.num_experts, dtype=torch.int64)
    rows = 0
    for rank in range(world_size):
        res = results[rank][f"{name}/{backend}"]
        want, counts_G = _single_rank(inp, inp["x"][rank])
        assert res["out"].shape == want.shape and res["out"].dtype == torch.float64
        torch.testing.assert_close(res["out"], want, rtol=1e-12, atol=1e-12,
                                   msg=lambda m: f"{name}/{backend} rank {rank}: {m}")
        # Each rank counts the routing of its own tokens, as the one-rank layer does for the same tokens.
        assert res["tokens_per_expert"][0].tolist() == counts_G.tolist()
        load_G += counts_G
        rows += res["tokens_dispatched"]
    assert int(load_G.sum()) == inp["top_k"] * sum(x.shape[0] for x in inp["x"])
    # Rows travel once per (token, destination rank): at least once per token, at most top_k times.
    tokens = sum(x.shape[0] for x in inp["x"])
    assert tokens <= rows <= inp["top_k"] * tokens


def test_hot_expert_is_served_by_every_replica(launched):
    """What makes the EP 3 hot case cover every replica: expert 1 has a copy on each rank and every token
    routes to it, so rank 0's five tokens use replicas (t + 0) % 3 = 0, 1, 2, 0, 1, one on each rank; the
    outputs above then match only if each copy holds expert 1's weights and serves its rows."""
    inp = launched[3][1]["e4k2_hot_everywhere"]
    placement = ExpertPlacement(**inp["placement"])
    assert [r for r, _ in placement.log2phy[1]] == [0, 1, 2]
    for x in inp["x"]:
        _, counts_G = _single_rank(inp, x)
        assert counts_G[1] == x.shape[0]  # every token chose expert 1
