"""The node-aware "two_level" all-to-all on 4 real ranks (gloo): equals one process, and crosses nodes once per node.

Oracle: `reference_fused_moe` over all G experts on each rank's own tokens,
float64. Node maps: two nodes of two ranks ([0,0,1,1], and interleaved
[0,1,0,1]), unequal nodes ([0,0,0,1]), one node, and non-contiguous node
numbers ([7,7,3,3]). Counters are checked against counts made here in plain
Python: dispatch rows = Σ over tokens of distinct destination ranks; network
rows = Σ over tokens of distinct destination NODES other than the sender's,
each addressed to the sender's rail peer in that node (same local index,
modulo the node's size). With one node the layout must be the "torch"
backend's, bit for bit.
"""
from __future__ import annotations

import pytest
import torch

from moelink.comm import make_all_to_all
from moelink.comm.backends import BACKENDS, resolve_backend
from moelink.kernels.moe import reference_fused_moe
from moelink.moe.placement import ExpertPlacement

HIDDEN, INTER, R = 16, 8, 4

NODE_MAPS = {"2x2": [0, 0, 1, 1], "interleaved": [0, 1, 0, 1], "3+1": [0, 0, 0, 1], "one_node": [0, 0, 0, 0],
             "renumbered": [7, 7, 3, 3]}
# name: (placement kwargs, tokens per rank, top-k, weight dtype)
CASES = {
    "e8k3": (dict(num_experts=8, ep_size=R), [9, 0, 5, 12], 3, torch.float64),
    "e6k2_uneven": (dict(num_experts=6, ep_size=R), [4, 7, 0, 5], 2, torch.float32),
    "e6k3_hot_replicas": (dict(num_experts=6, ep_size=R, replicas=[5, 5, 0]), [8, 8, 1, 8], 3, torch.float64),
    "e6k2_default_redundant": (dict(num_experts=6, ep_size=R, num_redundant=2), [2, 5, 5, 0], 2, torch.float64),
    "e8k4_round_robin": (dict(num_experts=8, ep_size=R, policy="round_robin"), [0, 0, 0, 3], 4, torch.float64),
    "all_empty": (dict(num_experts=8, ep_size=R), [0, 0, 0, 0], 2, torch.float64),
}


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    inputs = {}
    for name, (pkw, tokens, top_k, wdtype) in CASES.items():
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
    return inputs


def _layer_inputs(seed: int):
    """MoELayer scenarios (router included): 2 nodes x 2 ranks, and 3 + 1 with redundant slots."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, pkw, tokens, top_k, nodes in (
            ("e8k3_2x2", dict(num_experts=8, ep_size=R), [7, 0, 4, 9], 3, [0, 0, 1, 1]),
            ("e6k2_redundant_3+1", dict(num_experts=6, ep_size=R, num_redundant=2), [3, 6, 0, 5], 2, [0, 0, 0, 1])):
        G = pkw["num_experts"]
        out[name] = dict(
            placement=pkw, top_k=top_k, renormalize=True, nodes=nodes,
            gate=torch.randn(G, HIDDEN, generator=g, dtype=torch.float64),
            w13=torch.randn(G, 2 * INTER, HIDDEN, generator=g, dtype=torch.float64) / HIDDEN**0.5,
            w2=torch.randn(G, HIDDEN, INTER, generator=g, dtype=torch.float64) / INTER**0.5,
            x=[torch.randn(T, HIDDEN, generator=g, dtype=torch.float64) for T in tokens])
    return out


@pytest.fixture(scope="module")
def launches(ep_launch):
    inputs = _inputs(seed=3)
    scenarios = []
    for name, inp in inputs.items():
        for map_name, nodes in NODE_MAPS.items():
            scenarios.append(dict(name=f"{name}/{map_name}", backend="two_level", options=dict(node_of_rank=nodes),
                                  compute="moe", **inp))
        scenarios.append(dict(name=f"{name}/torch", backend="torch", compute="moe", **inp))
    layer_inputs = _layer_inputs(seed=5)
    layer_scenarios = [dict(name=name, backend="two_level", options=dict(node_of_rank=inp["nodes"]), **inp)
                       for name, inp in layer_inputs.items()]
    results, layer_results = ep_launch(dict(world_size=R, scenarios=scenarios),
                                       dict(world_size=R, scenarios=layer_scenarios, mode="layer"), timeout_s=180)
    return (results, inputs), (layer_results, layer_inputs)


@pytest.fixture(scope="module")
def launched(launches):
    return launches[0]


def _destinations(placement: ExpertPlacement, ids_TK: torch.Tensor, src_rank: int) -> list[set[int]]:
    """Where each token goes (plain Python over log2phy; replica rule: token t of rank s uses (t + s) % copies)."""
    log2phy = placement.log2phy
    return [{log2phy[e][(t + src_rank) % len(log2phy[e])][0] for e in row} for t, row in enumerate(ids_TK.tolist())]


def _gateway(nodes: list[int], src: int, node: int) -> int:
    members = [r for r in range(len(nodes)) if nodes[r] == node]
    local = [r for r in range(len(nodes)) if nodes[r] == nodes[src]].index(src)
    return members[local % len(members)]


@pytest.mark.parametrize("map_name", list(NODE_MAPS))
@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_process_and_counts(launched, name, map_name):
    results, inputs = launched
    inp, nodes = inputs[name], NODE_MAPS[map_name]
    placement = ExpertPlacement(**inp["placement"])
    dests = [_destinations(placement, inp["ids"][s], s) for s in range(R)]
    send = [[sum(r in d for d in dests[s]) for r in range(R)] for s in range(R)]
    total_inter = 0
    for rank in range(R):
        res = results[rank][f"{name}/{map_name}"]
        want = reference_fused_moe(inp["x"][rank], inp["w13"], inp["w2"], inp["weights"][rank], inp["ids"][rank])
        assert res["out"].shape == want.shape and res["out"].dtype == torch.float64
        torch.testing.assert_close(res["out"], want, rtol=1e-12, atol=1e-12,
                                   msg=lambda m: f"{name}/{map_name} rank {rank}: {m}")
        # Dispatch rows: one per (token, destination rank), whatever the path.
        rows = sum(len(d) for d in dests[rank])
        assert res["num_tokens_sent"] == rows and res["bytes_dispatched"] == rows * HIDDEN * 8
        assert res["send_counts"] == send[rank] and res["send_counts_list"] == send[rank]
        assert res["recv_counts"] == [send[s][rank] for s in range(R)], "rows received per origin rank"
        assert res["num_tokens_received"] == sum(send[s][rank] for s in range(R))
        # Network rows: one per (token, destination node other than the sender's), to the rail peer there.
        per_gateway = [0] * R
        for d in dests[rank]:
            for node in {nodes[r] for r in d} - {nodes[rank]}:
                per_gateway[_gateway(nodes, rank, node)] += 1
        assert res["inter_node_rows"] == per_gateway, (name, map_name, rank)
        assert res["bytes_inter_node"] == sum(per_gateway) * HIDDEN * 8
        total_inter += sum(per_gateway)
        # The receiver's view is the one-level backends': local slots or -1, weights 0 there.
        ids_NK, w_NK = res["recv_ids"], res["recv_weights"]
        assert ids_NK.shape[0] == res["num_tokens_received"]
        assert (ids_NK >= 0).any(1).all()
        assert ((ids_NK >= -1) & (ids_NK < placement.num_local_experts(rank))).all()
        assert not w_NK[ids_NK < 0].any()
    # The exact count of the issue, over all ranks: Σ_t |distinct destination nodes other than the sender's|.
    exact = sum(len({nodes[r] for r in d} - {nodes[s]}) for s in range(R) for d in dests[s])
    assert total_inter == exact
    if len(set(nodes)) > 1 and name != "all_empty":
        assert exact > 0  # the case exercises the network stage


@pytest.mark.parametrize("name", list(CASES))
def test_one_node_is_the_one_level_exchange(launched, name):
    """With one NVLink domain the rows, their order, the metadata and the output are the "torch" backend's."""
    results, _ = launched
    for rank in range(R):
        two, one = results[rank][f"{name}/one_node"], results[rank][f"{name}/torch"]
        for key in ("recv_x", "recv_ids", "recv_weights", "out"):
            assert torch.equal(two[key], one[key]), (name, rank, key)
        for key in ("send_counts_list", "recv_counts_list", "bytes_dispatched", "bytes_combined"):
            assert two[key] == one[key], (name, rank, key)
        assert two["inter_node_rows"] == [0] * R and two["bytes_inter_node"] == 0


def test_two_nodes_cross_less_than_one_level(launched):
    """Where a token's experts share a remote node, the network carries fewer rows than one-level dispatch would."""
    results, inputs = launched
    nodes = NODE_MAPS["2x2"]
    crossing_one_level = crossing_two_level = 0
    for rank in range(R):
        res = results[rank]["e8k3/2x2"]
        crossing_one_level += sum(c for r, c in enumerate(res["send_counts"]) if nodes[r] != nodes[rank])
        crossing_two_level += sum(res["inter_node_rows"])
    assert 0 < crossing_two_level < crossing_one_level


@pytest.mark.parametrize("name", ["e8k3_2x2", "e6k2_redundant_3+1"])
def test_moe_layer_runs_unchanged_and_records_network_rows(launches, name):
    """MoELayer over two_level equals one MoELayer over all experts; MoEStats counts the network rows exactly."""
    from moelink.kernels.ops import ReferenceKernels
    from moelink.moe.layer import MoELayer
    from moelink.moe.router import SoftmaxTopKRouter
    from moelink.moe.stats import MoEStats

    results, inputs = launches[1]
    inp = inputs[name]
    placement, nodes = ExpertPlacement(**inp["placement"]), inp["nodes"]
    G = inp["gate"].shape[0]
    layer = MoELayer(HIDDEN, INTER, G, SoftmaxTopKRouter(inp["top_k"], inp["renormalize"]), ReferenceKernels(),
                     torch.float64, stats=MoEStats(1, G, torch.device("cpu")))
    layer.gate_GD.copy_(inp["gate"])
    layer.w13_EFD.copy_(inp["w13"])
    layer.w2_EDI.copy_(inp["w2"])
    total = 0
    for rank in range(R):
        x = inp["x"][rank]
        res = results[rank][name]
        torch.testing.assert_close(res["out"], layer(x), rtol=1e-12, atol=1e-12)
        _, ids_TK = layer.router(torch.nn.functional.linear(x, layer.gate_GD), None)
        dests = _destinations(placement, ids_TK, rank)
        want = sum(len({nodes[r] for r in d} - {nodes[rank]}) for d in dests)
        assert res["inter_node_rows"] == want and res["bytes_inter_node"] == want * HIDDEN * 8
        assert res["tokens_dispatched"] == sum(len(d) for d in dests)
        total += want
    assert total > 0


# --- one process ------------------------------------------------------------------------------------

def test_registered_and_needs_a_node_map():
    spec = resolve_backend("two_level", 4)
    assert spec is BACKENDS["two_level"] and spec.needs_node_map and not spec.needs_capacity
    with pytest.raises(ValueError, match="needs node_of_rank"):
        make_all_to_all("two_level", None, 0, 1, "cpu")


@pytest.mark.parametrize("bad,match", [
    ([0, 0, 1], r"node_of_rank must have one entry per rank \(4\), got 3"),
    ([0, 0, -1, 1], r"node_of_rank\[2\]=-1 is invalid: node numbers must be integers >= 0"),
    ([0, 0, 1.0, 1], r"node_of_rank\[2\]=1.0 is invalid"),
    ("0011", r"node_of_rank must be a list of 4 node numbers"),
])
def test_bad_node_map(bad, match):
    with pytest.raises(ValueError, match=match):
        make_all_to_all("two_level", object(), 0, 4, "cpu", node_of_rank=bad)


def test_world_size_one_equals_no_exchange():
    placement = ExpertPlacement(num_experts=4, ep_size=1)
    g = torch.Generator().manual_seed(0)
    x, ids = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.tensor([[0, 3], [1, 2], [2, 0], [3, 1], [0, 1]])
    w = torch.rand(5, 2, generator=g, dtype=torch.float64)
    a2a = make_all_to_all("two_level", None, 0, 1, "cpu", node_of_rank=[0])
    recv_x, meta = a2a.dispatch(x, ids, w, placement.to_tensors("cpu"))
    assert torch.equal(recv_x, x) and torch.equal(meta.recv_topk_ids_NK, ids.to(torch.int32))
    assert meta.num_tokens_sent == 5 and meta.bytes_inter_node == 0
    assert torch.equal(a2a.combine(recv_x * 2, meta), x * 2)
    empty_x, empty_meta = a2a.dispatch(x[:0], ids[:0], w[:0], placement.to_tensors("cpu"))
    assert empty_x.shape == (0, 6) and a2a.combine(empty_x, empty_meta).shape == (0, 6)
