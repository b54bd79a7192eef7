"""EPLB (moe/eplb.py): packing invariants, replicas of hot experts, predicted imbalance, determinism, and the
greedy result against a brute-force optimum on tiny cases."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from moelink.moe.eplb import (LoadWindow, balanced_packing, imbalance, rank_load, rebalance_experts,
                              replicate)
from moelink.moe.placement import ExpertPlacement


def _layout(p):
    return [p.experts_on_rank(r) for r in range(p.ep_size)]


def _skewed(G, L=1, hot=(0, 1), share=0.5, seed=0):
    """Half of all routed pairs to the `hot` experts, the rest spread (a little unevenly) over the others."""
    rng = np.random.default_rng(seed)
    load = rng.uniform(0.8, 1.2, size=(L, G))
    cold = [e for e in range(G) if e not in hot]
    load[:, cold] *= (1 - share) / load[:, cold].sum(1, keepdims=True)
    load[:, list(hot)] = share / len(hot)
    return load * 10_000


def test_balanced_packing_fills_every_pack_exactly_and_balances():
    w = [9, 7, 6, 5, 4, 3, 2, 1]
    packs = balanced_packing(w, [2, 2, 2, 2])
    assert sorted(i for p in packs for i in p) == list(range(8))
    assert [len(p) for p in packs] == [2, 2, 2, 2]
    loads = [sum(w[i] for i in p) for p in packs]
    assert max(loads) - min(loads) <= 3  # greedy: 9+1, 7+2, 6+3, 5+4
    packs = balanced_packing([5, 1, 1, 1, 1], [1, 4])
    assert [sorted(p) for p in packs] == [[0], [1, 2, 3, 4]]
    with pytest.raises(ValueError, match="capacities sum to"):
        balanced_packing([1, 2], [1, 2])


def test_balanced_packing_never_puts_two_of_one_key_in_a_pack():
    # Greedy alone would put both copies of key 0 on pack 1 (pack 0 fills first with the heavy key 1): the repair
    # moves key 1 over.
    packs = balanced_packing([1.0, 0.4, 0.4], [1, 2], keys=[1, 0, 0])
    for p in packs:
        assert len({[1, 0, 0][i] for i in p}) == len(p)
    assert sorted(len(p) for p in packs) == [1, 2]


def test_replicate_copies_the_hottest_per_copy():
    assert replicate([8, 1, 1, 2], 7, 4) == [4, 1, 1, 1]
    assert replicate([8, 1, 1, 4], 7, 4) == [3, 1, 1, 2]
    assert sum(replicate([8, 1, 1, 4], 7, 2)) == 7 and max(replicate([8, 1, 1, 4], 7, 2)) == 2
    with pytest.raises(ValueError, match="one per rank"):
        replicate([1, 1], 5, 2)


@pytest.mark.parametrize("G,R,red", [(8, 4, 0), (8, 4, 4), (16, 4, 4), (6, 4, 2), (10, 3, 5)])
def test_every_expert_placed_slot_counts_kept_no_duplicates(G, R, red):
    prev = ExpertPlacement(num_experts=G, ep_size=R, num_redundant=red)
    load = _skewed(G, L=3)
    res = rebalance_experts(load, prev)
    assert len(res.placements) == 3
    for p in res.placements:
        assert p.slots_per_rank == prev.slots_per_rank
        assert set(p.phy2log) == set(range(G))
        assert p.num_redundant == red
        for r in range(R):
            assert len(set(p.experts_on_rank(r))) == p.num_local_experts(r)
        # the predicted load conserves the total
        assert rank_load(p, load[0]).sum() == pytest.approx(load[0].sum())


def test_hot_experts_get_the_replicas_and_imbalance_falls():
    G, R = 16, 4
    load = _skewed(G, L=2, hot=(8, 9))  # 50 % of the tokens to experts 8 and 9
    prev = ExpertPlacement(num_experts=G, ep_size=R, num_redundant=4)
    res = rebalance_experts(load, prev)
    for p in res.placements:
        copies = [p.phy2log.count(e) for e in range(G)]
        assert copies[8] >= 2 and copies[9] >= 2
        assert sum(copies) - copies[8] - copies[9] == G - 2  # every redundant slot went to a hot expert
    # Contiguous: experts 8 and 9 on rank 2 carry half the load (the default copies are of experts 0..3).
    assert res.imbalance_before > 1.6
    assert res.imbalance_after < 1.1
    assert res.imbalance_after < res.imbalance_before
    np.testing.assert_allclose(res.rank_load_after_LR.sum(1), load.sum(1))
    # no redundancy: EPLB can only repack, and the two hot experts go to different ranks
    res0 = rebalance_experts(load, ExpertPlacement(num_experts=G, ep_size=R))
    for p in res0.placements:
        assert p.log2phy[8][0][0] != p.log2phy[9][0][0]
    assert res0.imbalance_after < res0.imbalance_before


def test_deterministic_and_keeps_what_ranks_already_hold():
    prev = ExpertPlacement(num_experts=16, ep_size=4, num_redundant=4)
    load = _skewed(16, L=2, seed=3)
    a, b = rebalance_experts(load, prev), rebalance_experts(load.copy(), prev)
    assert [_layout(p) for p in a.placements] == [_layout(p) for p in b.placements]
    # Rebalancing again on the same load finds the same placement, and nothing moves.
    again = rebalance_experts(load, a.placements)
    assert [_layout(p) for p in again.placements] == [_layout(p) for p in a.placements]
    # An expert a rank held before keeps its local slot (its weights need not move).
    shifted = rebalance_experts(load[::-1], a.placements).placements[0]
    for old, new in [(prev, a.placements[0]), (a.placements[0], shifted)]:
        kept = 0
        for r in range(4):
            for i, e in enumerate(old.experts_on_rank(r)):
                if e in new.experts_on_rank(r):
                    assert new.experts_on_rank(r)[i] == e
                    kept += 1
        assert kept >= 1


def test_hierarchical_keeps_groups_on_nodes_and_global_fallback():
    G, R = 16, 4
    prev = ExpertPlacement(num_experts=G, ep_size=R, num_redundant=4)
    load = _skewed(G, L=1, hot=(0, 5))
    res = rebalance_experts(load, prev, num_groups=4, node_of_rank=[0, 0, 1, 1])
    p = res.placements[0]
    node_experts = [set(p.experts_on_rank(0)) | set(p.experts_on_rank(1)),
                    set(p.experts_on_rank(2)) | set(p.experts_on_rank(3))]
    for g in range(4):
        group = set(range(4 * g, 4 * g + 4))
        assert sum(bool(group & n) for n in node_experts) == 1  # a group lives on one node
    assert not (node_experts[0] & node_experts[1])  # copies stay within a node
    assert res.imbalance_after < res.imbalance_before
    # 3 groups do not divide 2 nodes: global variant (copies may cross nodes), still valid and better.
    g3 = rebalance_experts(_skewed(12, hot=(0, 1)), ExpertPlacement(num_experts=12, ep_size=4, num_redundant=4),
                           num_groups=3, node_of_rank=[0, 0, 1, 1])
    assert g3.imbalance_after < g3.imbalance_before
    assert set(g3.placements[0].phy2log) == set(range(12))


def _brute_force(load_G, slots_R):
    """The least max rank load over every replica count and every assignment (one copy per rank)."""
    G, R, P = len(load_G), len(slots_R), sum(slots_R)
    best = float("inf")
    for counts in itertools.product(range(1, R + 1), repeat=G):
        if sum(counts) != P:
            continue
        items = [(e, load_G[e] / c) for e, c in enumerate(counts) for _ in range(c)]
        for ranks in itertools.product(range(R), repeat=P):
            if any(ranks.count(r) != slots_R[r] for r in range(R)):
                continue
            held = [[items[i][0] for i in range(P) if ranks[i] == r] for r in range(R)]
            if any(len(set(h)) != len(h) for h in held):
                continue
            best = min(best, max(sum(items[i][1] for i in range(P) if ranks[i] == r) for r in range(R)))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_close_to_brute_force_optimum_on_tiny_cases(seed):
    rng = np.random.default_rng(seed)
    G, R, red = [(3, 2, 1), (4, 2, 0), (4, 2, 2), (4, 3, 2), (5, 2, 1), (3, 3, 3)][seed % 6]
    load = rng.integers(1, 20, size=G).astype(float)
    if seed % 2:
        load[0] *= 5  # one very hot expert
    prev = ExpertPlacement(num_experts=G, ep_size=R, num_redundant=red)
    got = rebalance_experts(load[None], prev).rank_load_after_LR[0].max()
    opt = _brute_force(load, prev.slots_per_rank)
    assert opt <= got + 1e-9  # the optimum is a true lower bound
    assert got <= 4 / 3 * opt + 1e-9, (G, R, red, load, got, opt)


def test_bad_input_is_named():
    prev = ExpertPlacement(num_experts=8, ep_size=4, num_redundant=4)
    with pytest.raises(ValueError, match="load_LG has 6 experts"):
        rebalance_experts(np.ones((1, 6)), prev)
    with pytest.raises(ValueError, match="num_redundant=2 differs"):
        rebalance_experts(np.ones((1, 8)), prev, num_redundant=2)
    with pytest.raises(ValueError, match="num_groups must be"):
        rebalance_experts(np.ones((1, 8)), prev, num_groups=3)
    with pytest.raises(ValueError, match="finite loads"):
        rebalance_experts(-np.ones((1, 8)), prev)
    with pytest.raises(ValueError, match="node_of_rank"):
        rebalance_experts(np.ones((1, 8)), prev, node_of_rank=[0, 1])


def test_imbalance_and_load_window():
    assert imbalance(np.array([3.0, 1.0])) == 1.5 and imbalance(np.zeros(2)) == 1.0
    w = LoadWindow(2, 1, 2)
    for step in ([[1, 0]], [[0, 2]], [[5, 5]]):
        w.add(step)
    assert w.total_LG.tolist() == [[5, 7]] and len(w) == 2  # the first step left the window
    with pytest.raises(ValueError, match="LoadWindow.steps"):
        LoadWindow(0, 1, 2)
    with pytest.raises(ValueError, match="shape"):
        w.add([[1, 2, 3]])


def test_placement_layout_validation():
    p = ExpertPlacement(num_experts=4, ep_size=2, layout=[[0, 1, 2], [3, 0]])
    assert p.replicas == (0,) and p.num_redundant == 1 and p.slots_per_rank == (3, 2)
    assert p.log2phy[0] == [(0, 0), (1, 1)]
    for bad, msg in [([[0, 1], [2]], "no copy of experts \\[3\\]"), ([[0, 0], [1, 2, 3]], "twice"),
                     ([[0, 1, 2, 3], []], "non-empty"), ([[0, 1, 2, 9]] * 2, "integers in"),
                     ([[0, 1, 2, 3]], "list of ep_size=2")]:
        with pytest.raises(ValueError, match=msg):
            ExpertPlacement(num_experts=4, ep_size=2, layout=bad)
    with pytest.raises(ValueError, match="defaults"):
        ExpertPlacement(num_experts=4, ep_size=2, layout=[[0, 1], [2, 3]], policy="round_robin")
