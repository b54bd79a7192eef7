"""The two dispatch modes (comm/ep_modes.py) on real gloo ranks and in one process.

Multi-rank (EP 2 and 3, `MoELayer.forward` on each rank as a worker runs it): random gates, hence random
routings, ragged token counts with an empty rank, replicas. Each scenario runs low-latency (a fixed decode
capacity above every rank's tokens), high-throughput (blocks of the step's largest tokens-per-rank) and the
exact "torch" backend. Oracles, all independent of the code under test:
- outputs: one MoELayer over all experts on the rank's tokens (float64, 1e-12);
- rows sent per rank: Σ over its tokens of distinct destination ranks, from a plain-Python top-k and the
  placement's replica rule (token t of rank s uses replica (t + s) % count), NOT R x capacity;
- wire rows: R x C of the mode (reported apart from the payload rows);
- host syncs in the layer (expert kernel excluded): 0 in both modes; the exact backend's bound is 1 per
  dispatch (its counts read);
- comm.ep_modes.dispatch_wire_bytes, the cluster model's formula, gives the measured bytes.
"""
from __future__ import annotations

import pytest
import torch

from moelink.comm import make_all_to_all
from moelink.comm.ep_modes import (EXACT, HIGH_THROUGHPUT, LOW_LATENCY, HighThroughputMode, LowLatencyMode,
                                   TwoModeAllToAll, dispatch_wire_bytes)
from moelink.engine.contract.ep_step import EPStepPlan
from moelink.kernels.moe import reference_fused_moe
from moelink.kernels.ops import ReferenceKernels
from moelink.moe.layer import MoELayer
from moelink.moe.placement import ExpertPlacement
from moelink.moe.router import SoftmaxTopKRouter
from moelink.moe.stats import MoEStats

HIDDEN, INTER = 16, 8
MODES = (LOW_LATENCY, HIGH_THROUGHPUT, EXACT)

# name: (placement kwargs, tokens per rank, top-k)
CASES = {
    2: {"e6k3": (dict(num_experts=6, ep_size=2), [7, 0], 3),
        "e5k2_replica": (dict(num_experts=5, ep_size=2, replicas=[0]), [4, 9], 2)},
    3: {"e9k3": (dict(num_experts=9, ep_size=3), [5, 8, 0], 3),
        "e6k2_redundant": (dict(num_experts=6, ep_size=3, num_redundant=3), [6, 1, 6], 2)},
}
DECODE_CAPACITY = 12  # above every rank's tokens: every case fits the low-latency blocks


def _build(world_size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    scenarios, inputs = [], {}
    for name, (pkw, tokens, top_k) in CASES[world_size].items():
        G = pkw["num_experts"]
        inp = dict(placement=pkw, gate=torch.randn(G, HIDDEN, generator=g, dtype=torch.float64),
                   w13=torch.randn(G, 2 * INTER, HIDDEN, generator=g, dtype=torch.float64) / HIDDEN**0.5,
                   w2=torch.randn(G, HIDDEN, INTER, generator=g, dtype=torch.float64) / INTER**0.5,
                   x=[torch.randn(T, HIDDEN, generator=g, dtype=torch.float64) for T in tokens],
                   top_k=top_k, renormalize=True)
        inputs[name] = inp
        steps = {LOW_LATENCY: (LOW_LATENCY, max(tokens), DECODE_CAPACITY),
                 HIGH_THROUGHPUT: (HIGH_THROUGHPUT, max(tokens), DECODE_CAPACITY), EXACT: None}
        for mode, step in steps.items():
            backend = "torch" if mode == EXACT else "torch_padded"
            options = {} if mode == EXACT else dict(max_tokens_per_rank=64)
            scenarios.append(dict(name=f"{name}/{mode}", backend=backend, options=options, step=step, **inp))
    return scenarios, inputs


@pytest.fixture(scope="module")
def launched(ep_launch):
    s2, i2 = _build(2, seed=11)
    s3, i3 = _build(3, seed=12)
    r2, r3 = ep_launch(dict(world_size=2, scenarios=s2, mode="layer"), dict(world_size=3, scenarios=s3, mode="layer"),
                       timeout_s=180)
    return {2: (r2, i2), 3: (r3, i3)}


def _oracle_out(inp, x_TD):
    G = inp["gate"].shape[0]
    layer = MoELayer(HIDDEN, INTER, G, SoftmaxTopKRouter(inp["top_k"], True), ReferenceKernels(), torch.float64)
    layer.gate_GD.copy_(inp["gate"])
    layer.w13_EFD.copy_(inp["w13"])
    layer.w2_EDI.copy_(inp["w2"])
    return layer(x_TD)


def _destinations(inp, x_TD, src_rank: int) -> list[set[int]]:
    """Plain Python: top-k experts of each token by its gate scores, then the replica rule."""
    log2phy = ExpertPlacement(**inp["placement"]).log2phy
    scores = (x_TD @ inp["gate"].T).tolist()
    out = []
    for t, row in enumerate(scores):
        top = sorted(range(len(row)), key=lambda e: -row[e])[: inp["top_k"]]
        out.append({log2phy[e][(t + src_rank) % len(log2phy[e])][0] for e in top})
    return out


@pytest.mark.parametrize("world_size, name", [(w, n) for w in CASES for n in CASES[w]])
@pytest.mark.parametrize("mode", MODES)
def test_modes_are_exact_and_count_rows_per_destination_rank(launched, world_size, name, mode):
    results, inputs = launched[world_size]
    inp = inputs[name]
    R = world_size
    dests = [_destinations(inp, inp["x"][s], s) for s in range(R)]
    tokens = [x.shape[0] for x in inp["x"]]
    capacity = {LOW_LATENCY: DECODE_CAPACITY, HIGH_THROUGHPUT: max(tokens)}.get(mode)
    for rank in range(R):
        res = results[rank][f"{name}/{mode}"]
        torch.testing.assert_close(res["out"], _oracle_out(inp, inp["x"][rank]), rtol=1e-12, atol=1e-12)
        rows = sum(len(d) for d in dests[rank])
        received = sum(sum(rank in d for d in dests[s]) for s in range(R))
        assert res["tokens_dispatched"] == rows, (mode, rank)
        assert res["rows_received"] == received, (mode, rank)
        assert res["bytes_dispatched"] == rows * HIDDEN * 8
        wire_rows = rows if mode == EXACT else R * capacity
        assert res["wire_rows"] == wire_rows and res["wire_bytes"] == wire_rows * HIDDEN * 8
        # The planner's formula, fed the measured mean distinct ranks per token, gives the measured bytes.
        if tokens[rank]:
            b = dispatch_wire_bytes(mode, world_size=R, tokens=tokens[rank], distinct_ranks_per_token=rows / tokens[rank],
                                    row_bytes=HIDDEN * 8, capacity=capacity)
            assert b.payload == pytest.approx(res["bytes_dispatched"]) and b.wire == res["wire_bytes"]
        # Host syncs inside the MoE layer (one layer here): none on the fixed-capacity modes; the exact
        # backend reads its counts once per dispatch (its bound).
        assert res["host_syncs"] == ([1] if mode == EXACT else [0]), (mode, rank, res["sync_where"])
    if mode == LOW_LATENCY:
        # The wire pays for the fixed blocks; the counters still say what was really sent.
        assert sum(results[r][f"{name}/{mode}"]["tokens_dispatched"] for r in range(R)) < R * R * DECODE_CAPACITY


# -- one process (world size 1 over the padded transport) ---------------------------------------------------
def _inputs(T=9, G=6, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, HIDDEN, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(G, generator=g)[:K] for _ in range(T)])
    w = torch.softmax(torch.randn(T, K, generator=g, dtype=torch.float64), -1)
    w13 = torch.randn(G, 2 * INTER, HIDDEN, generator=g, dtype=torch.float64)
    w2 = torch.randn(G, HIDDEN, INTER, generator=g, dtype=torch.float64)
    return x, ids, w, w13, w2


def _two_mode(decode_capacity=4, built=32):
    return TwoModeAllToAll(make_all_to_all("torch_padded", None, 0, 1, "cpu", max_tokens_per_rank=built), decode_capacity)


def test_the_step_plan_picks_the_mode_object_and_its_capacity():
    a2a = _two_mode(decode_capacity=4, built=32)
    tables = ExpertPlacement(num_experts=6, ep_size=1).to_tensors("cpu")
    x, ids, w, w13, w2 = _inputs(T=3)
    assert isinstance(a2a.mode, HighThroughputMode) and a2a.mode.capacity == 32  # before any plan: as built
    a2a.begin_step(EPStepPlan(LOW_LATENCY, 3))
    assert a2a.mode is a2a.low_latency and isinstance(a2a.mode, LowLatencyMode) and a2a.mode.graph_safe
    recv, meta = a2a.dispatch(x, ids, w, tables)
    assert recv.shape == (4, HIDDEN) and meta.wire_rows == 4 and meta.mode == LOW_LATENCY
    a2a.begin_step(EPStepPlan(HIGH_THROUGHPUT, 7))
    assert isinstance(a2a.mode, HighThroughputMode) and not a2a.mode.graph_safe
    recv, meta = a2a.dispatch(x, ids, w, tables)
    assert recv.shape == (7, HIDDEN) and meta.wire_rows == 7 and meta.mode == HIGH_THROUGHPUT
    out = a2a.combine(reference_fused_moe(recv, w13, w2, meta.recv_topk_weights_NK, meta.recv_topk_ids_NK), meta)
    torch.testing.assert_close(out, reference_fused_moe(x, w13, w2, w, ids), rtol=1e-12, atol=1e-12)
    a2a.begin_step(None)  # a step without a plan: back to the built capacity, never the last step's mode
    assert isinstance(a2a.mode, HighThroughputMode) and a2a.mode.capacity == 32


def test_tokens_above_the_capacity_are_refused_never_dropped():
    a2a = _two_mode(decode_capacity=4)
    tables = ExpertPlacement(num_experts=6, ep_size=1).to_tensors("cpu")
    with pytest.raises(ValueError, match="above the decode capacity 4"):
        a2a.begin_step(EPStepPlan(LOW_LATENCY, 5))
    a2a.begin_step(EPStepPlan(LOW_LATENCY, 4))
    x, ids, w, _, _ = _inputs(T=5)
    with pytest.raises(ValueError, match="got 5 tokens, above this step's per-rank capacity 4"):
        a2a.dispatch(x, ids, w, tables)
    with pytest.raises(ValueError, match="got 5 tokens"):
        a2a.dispatch_async(x, ids, w, tables)
    with pytest.raises(ValueError, match="mode 'turbo' is invalid"):
        a2a.begin_step(type("Plan", (), dict(mode="turbo", max_tokens_per_rank=1))())
    with pytest.raises(ValueError, match="EPStepPlan.mode='turbo' is invalid"):
        EPStepPlan("turbo", 1)


def test_async_forms_are_forwarded_and_padding_rows_go_nowhere():
    """Rows with ids -1 (a decode graph's padding) are sent to no rank: they count in no row and come back 0."""
    a2a = _two_mode(decode_capacity=8)
    a2a.begin_step(EPStepPlan(LOW_LATENCY, 6))
    tables = ExpertPlacement(num_experts=6, ep_size=1).to_tensors("cpu")
    x, ids, w, w13, w2 = _inputs(T=6)
    ids[4:] = -1  # two padding rows
    recv, meta = a2a.dispatch_async(x, ids, w, tables).wait()
    assert meta.mode == LOW_LATENCY
    assert int(meta.send_counts_R.sum()) == 4 and int(meta.recv_counts_R.sum()) == 4
    y = reference_fused_moe(recv, w13, w2, meta.recv_topk_weights_NK, meta.recv_topk_ids_NK)
    out = a2a.combine_async(y, meta).wait()
    torch.testing.assert_close(out[:4], reference_fused_moe(x[:4], w13, w2, w[:4], ids[:4]), rtol=1e-12, atol=1e-12)
    assert not out[4:].any()
    stats = MoEStats(1, 6, torch.device("cpu"))
    stats.record_transfer(0, meta)
    snap = stats.snapshot()
    assert (snap.tokens_dispatched, snap.rows_received, snap.wire_rows) == (4, 4, 8)
    assert snap.bytes_dispatched == 4 * HIDDEN * 8 and snap.wire_bytes == 8 * HIDDEN * 8


def test_dispatch_wire_bytes_per_mode():
    kw = dict(world_size=4, tokens=10, distinct_ranks_per_token=2.5, row_bytes=100, meta_row_bytes=10)
    exact = dispatch_wire_bytes(EXACT, **kw)
    assert (exact.payload, exact.wire, exact.metadata) == (2500, 2500, 250)
    ll = dispatch_wire_bytes(LOW_LATENCY, capacity=16, **kw)
    assert (ll.payload, ll.wire, ll.metadata) == (2500, 4 * 16 * 100, 4 * 16 * 10)
    assert dispatch_wire_bytes(HIGH_THROUGHPUT, **kw).wire == 4 * 10 * 100  # default C = T
    with pytest.raises(ValueError, match="capacity 8 is below the 10 tokens"):
        dispatch_wire_bytes(LOW_LATENCY, capacity=8, **kw)
    with pytest.raises(ValueError, match="dispatch mode 'fast' is invalid"):
        dispatch_wire_bytes("fast", **kw)


def test_the_cluster_model_reads_the_same_formula():
    """comm.link_model's per-rank bytes come from dispatch_wire_bytes: exact rows as before, and a mode's fixed
    blocks (capacity rows to every peer, whatever the routing) when it models one."""
    from moelink.comm.link_model import Pattern, RoutingSpec, a2a_bytes

    routing = RoutingSpec(num_experts=64, top_k=6)
    d = routing.distinct_ranks(8)
    intra, inter, n_intra, n_inter = a2a_bytes(100, routing, 8, 8, Pattern.RANK, 1000)
    assert (n_intra, n_inter) == (7, 0) and intra == pytest.approx(100 * d * 7 / 8 * 1000) and inter == 0
    intra, _, _, _ = a2a_bytes(100, routing, 8, 8, Pattern.RANK, 1000, mode=LOW_LATENCY, capacity=256)
    assert intra == pytest.approx(256 * 7 * 1000)  # 256 rows to each of the 7 peers
    want = dispatch_wire_bytes(HIGH_THROUGHPUT, world_size=8, tokens=100, distinct_ranks_per_token=d, row_bytes=1000)
    intra, _, _, _ = a2a_bytes(100, routing, 8, 8, Pattern.RANK, 1000, mode=HIGH_THROUGHPUT)
    assert intra == pytest.approx(want.wire * 7 / 8)
