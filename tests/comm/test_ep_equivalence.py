"""EP = 2 and 4 on real ranks (gloo): dispatch → local experts → combine equals one process over all experts.

Oracle: `reference_fused_moe` over all G experts on each rank's own tokens,
float64. Placements cover even, uneven (6 experts on 4 ranks), round-robin and
redundant replicas; token counts include a rank with none. Every scenario runs
on both exact ("torch") and padded ("torch_padded") layouts. The traffic
counters are checked against an independent count of distinct destination ranks
(replica rule: token t of rank s uses replica (t + s) % count).
"""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.moe import reference_fused_moe
from moelink.moe.placement import ExpertPlacement

HIDDEN, INTER = 16, 8
BACKENDS = ("torch", "torch_padded")

# name: (placement kwargs, tokens per rank, top-k, weight dtype)
CASES = {
    2: {
        "e4k2_rank1_empty": (dict(num_experts=4, ep_size=2), [5, 0], 2, torch.float64),
        "e5k3_replica": (dict(num_experts=5, ep_size=2, replicas=[0]), [7, 4], 3, torch.float32),
        "e6k3_round_robin": (dict(num_experts=6, ep_size=2, policy="round_robin"), [3, 6], 3, torch.float64),
    },
    4: {
        "e8k2": (dict(num_experts=8, ep_size=4), [6, 0, 3, 9], 2, torch.float32),
        "e6k3_uneven": (dict(num_experts=6, ep_size=4), [4, 7, 0, 5], 3, torch.float64),
        "e6k3_hot_replicas": (dict(num_experts=6, ep_size=4, replicas=[5, 5, 0]), [8, 8, 1, 8], 3, torch.float32),
        "e6k2_default_redundant": (dict(num_experts=6, ep_size=4, num_redundant=2), [2, 5, 5, 0], 2, torch.float64),
    },
}


def _build(world_size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    scenarios, inputs = [], {}
    for name, (pkw, tokens, top_k, wdtype) in CASES[world_size].items():
        G = pkw["num_experts"]
        w13 = torch.randn(G, 2 * INTER, HIDDEN, generator=g, dtype=torch.float64) / HIDDEN**0.5
        w2 = torch.randn(G, HIDDEN, INTER, generator=g, dtype=torch.float64) / INTER**0.5
        xs, ids, ws = [], [], []
        for T in tokens:
            xs.append(torch.randn(T, HIDDEN, generator=g, dtype=torch.float64))
            ids.append(torch.stack([torch.randperm(G, generator=g)[:top_k] for _ in range(T)])
                       if T else torch.zeros(0, top_k, dtype=torch.long))
            ws.append(torch.softmax(torch.randn(T, top_k, generator=g, dtype=torch.float64), -1).to(wdtype))
        inputs[name] = dict(placement=pkw, x=xs, ids=ids, weights=ws, w13=w13, w2=w2)
        for backend in BACKENDS:
            options = dict(max_tokens_per_rank=max(tokens)) if backend == "torch_padded" else {}
            scenarios.append(dict(name=f"{name}/{backend}", backend=backend, options=options, compute="moe",
                                  **inputs[name]))
    return scenarios, inputs


def _bf16_scenarios():
    # Transport check in bf16: rows must arrive bit-exact; with y = x, out = x · (distinct ranks of the token).
    g = torch.Generator().manual_seed(7)
    x = [torch.randn(T, 8, generator=g).bfloat16() for T in (4, 3)]
    ids = [torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(T)]) for T in (4, 3)]
    w = [torch.rand(T, 2, generator=g) for T in (4, 3)]
    bf16 = dict(placement=dict(num_experts=4, ep_size=2), x=x, ids=ids, weights=w, compute="identity")
    return [dict(name="bf16/torch", backend="torch", **bf16),
            dict(name="bf16/torch_padded", backend="torch_padded", options=dict(max_tokens_per_rank=4), **bf16)], bf16


@pytest.fixture(scope="module")
def launched(ep_launch):
    """EP=2 and EP=4 groups, run at the same time."""
    scenarios2, inputs2 = _build(2, seed=0)
    bf16_scenarios, inputs2["bf16"] = _bf16_scenarios()
    scenarios4, inputs4 = _build(4, seed=1)
    res2, res4 = ep_launch(dict(world_size=2, scenarios=scenarios2 + bf16_scenarios),
                           dict(world_size=4, scenarios=scenarios4))
    return (res2, inputs2), (res4, inputs4)


@pytest.fixture(scope="module")
def ep2(launched):
    return launched[0]


@pytest.fixture(scope="module")
def ep4(launched):
    return launched[1]


def _destinations(placement: ExpertPlacement, ids_TK: torch.Tensor, src_rank: int) -> list[set[int]]:
    """Independent oracle of where each token goes (plain Python over log2phy)."""
    log2phy = placement.log2phy
    out = []
    for t, row in enumerate(ids_TK.tolist()):
        out.append({log2phy[e][(t + src_rank) % len(log2phy[e])][0] for e in row})
    return out


def _check_case(results, inputs, world_size, name):
    inp = inputs[name]
    placement = ExpertPlacement(**inp["placement"])
    dests = [_destinations(placement, inp["ids"][s], s) for s in range(world_size)]
    # send[s][r]: rows rank s sends to rank r.
    send = [[sum(r in d for d in dests[s]) for r in range(world_size)] for s in range(world_size)]
    for backend in BACKENDS:
        total_dispatched = total_combined = 0
        for rank in range(world_size):
            res = results[rank][f"{name}/{backend}"]
            want = reference_fused_moe(inp["x"][rank], inp["w13"], inp["w2"], inp["weights"][rank], inp["ids"][rank])
            assert res["out"].shape == want.shape and res["out"].dtype == torch.float64
            torch.testing.assert_close(res["out"], want, rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"{name}/{backend} rank {rank}: {m}")
            # Bytes: Σ over tokens of distinct destination ranks × hidden × element size.
            rows = sum(len(d) for d in dests[rank])
            assert res["send_counts"] == send[rank], (name, backend, rank)
            assert res["recv_counts"] == [send[s][rank] for s in range(world_size)], (name, backend, rank)
            assert res["num_tokens_sent"] == rows
            assert res["bytes_dispatched"] == rows * HIDDEN * 8
            assert res["bytes_combined"] == sum(send[s][rank] for s in range(world_size)) * HIDDEN * 8
            top_k = inp["ids"][rank].shape[1]
            assert res["bytes_metadata"] == rows * top_k * (4 + inp["weights"][rank].element_size())
            total_dispatched += res["bytes_dispatched"]
            total_combined += res["bytes_combined"]
            # Every received row has at least one local entry; ids are local slots, weights 0 where -1.
            ids_NK, w_NK = res["recv_ids"], res["recv_weights"]
            valid_N = (ids_NK >= 0).any(1)
            assert valid_N.sum() == sum(send[s][rank] for s in range(world_size))
            assert ((ids_NK >= -1) & (ids_NK < placement.num_local_experts(rank))).all()
            assert not w_NK[ids_NK < 0].any()
        assert total_dispatched == total_combined


@pytest.mark.parametrize("name", list(CASES[2]))
def test_ep2_matches_single_process(ep2, name):
    _check_case(*ep2, 2, name)


@pytest.mark.parametrize("name", list(CASES[4]))
def test_ep4_matches_single_process(ep4, name):
    _check_case(*ep4, 4, name)


def test_hot_replicas_are_all_used(ep4):
    """Expert 5 has copies on three ranks: each of them must receive rows for it (the replica rule spreads)."""
    results, inputs = ep4
    placement = ExpertPlacement(**inputs["e6k3_hot_replicas"]["placement"])
    holders = placement.log2phy[5]
    assert len(holders) == 3
    for rank, slot in holders:
        ids_NK = results[rank]["e6k3_hot_replicas/torch"]["recv_ids"]
        assert (ids_NK == slot).any(), f"replica of expert 5 on rank {rank} got no rows"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_rows_arrive_bit_exact(ep2, backend):
    results, inputs = ep2
    inp = inputs["bf16"]
    placement = ExpertPlacement(**inp["placement"])
    for rank in range(2):
        res = results[rank][f"bf16/{backend}"]
        assert res["recv_x"].dtype == torch.bfloat16 and res["recv_weights"].dtype == torch.float32
        dests = _destinations(placement, inp["ids"][rank], rank)
        want = inp["x"][rank] * torch.tensor([len(d) for d in dests], dtype=torch.bfloat16)[:, None]
        assert torch.equal(res["out"], want)
        assert res["bytes_dispatched"] == sum(len(d) for d in dests) * 8 * 2
