"""Link and all-to-all volume models (moelink.comm.link_model) against hand-computed cases and brute force."""
from __future__ import annotations

import itertools
import math
import random

import pytest

from moelink.comm.link_model import (Fabric, LinkSpec, Pattern, RoutingSpec, a2a_bytes, all_to_all_time,
                                     expected_distinct_ranks, payload_bytes)

# An ideal link: 100 GB/s, no latency, full efficiency, no small-message penalty.
IDEAL = LinkSpec("ideal", bw_gbps=100, latency_s=0.0, efficiency=1.0, half_bw_bytes=0.0)


def test_transfer_time_hand_computed():
    assert IDEAL.transfer_time(1e9) == pytest.approx(0.01)  # 1 GB at 100 GB/s
    link = LinkSpec("l", bw_gbps=50, latency_s=10e-6, efficiency=0.8, half_bw_bytes=4e3)
    # 8 MB in 4 KB messages: half the asymptotic 40 GB/s -> 20 GB/s -> 400 us, plus 10 us latency.
    assert link.transfer_time(8e6, bytes_per_peer=4e3) == pytest.approx(10e-6 + 8e6 / 20e9)
    assert link.transfer_time(0) == 0.0


def test_payload_bytes():
    assert payload_bytes(7168, "bf16") == 14336
    assert payload_bytes(7168, "fp8") == 7168 + 4 * 56  # one fp32 scale per 128 elements
    assert payload_bytes(7168, "nvfp4") == 3584 + 448   # one fp8 scale per 16 elements
    with pytest.raises(ValueError, match="payload dtype='int4'"):
        payload_bytes(7168, "int4")


def _brute_distinct(E, k, R, n_group=1, topk_group=1):
    """Average distinct ranks over every group choice and every expert choice within the chosen groups."""
    e, ge = E // R, E // n_group
    total = count = 0
    for groups in itertools.combinations(range(n_group), topk_group):
        pool = [x for g in groups for x in range(g * ge, (g + 1) * ge)]
        for experts in itertools.combinations(pool, k):
            total += len({x // e for x in experts})
            count += 1
    return total / count


@pytest.mark.parametrize("E,k,R", [(8, 2, 4), (8, 3, 2), (12, 4, 6), (16, 3, 8), (16, 1, 16), (6, 6, 3)])
def test_distinct_ranks_uniform_exact(E, k, R):
    assert expected_distinct_ranks(E, k, R) == pytest.approx(_brute_distinct(E, k, R), rel=1e-12)


@pytest.mark.parametrize("E,k,R,ng,tg", [(16, 3, 2, 4, 2), (16, 3, 4, 4, 2), (16, 3, 8, 4, 2), (16, 4, 16, 4, 2),
                                         (24, 3, 2, 6, 3), (24, 2, 12, 6, 2), (12, 3, 4, 4, 3)])
def test_distinct_ranks_group_limited_exact(E, k, R, ng, tg):
    got = expected_distinct_ranks(E, k, R, n_group=ng, topk_group=tg)
    assert got == pytest.approx(_brute_distinct(E, k, R, ng, tg), rel=1e-12)


def test_distinct_ranks_deepseek_ep8_at_most_four():
    # DeepSeek-V3 routes inside 4 of 8 groups; with one group per rank a token reaches at most 4 ranks.
    d = expected_distinct_ranks(256, 8, 8, n_group=8, topk_group=4)
    assert 3.5 < d <= 4.0
    assert expected_distinct_ranks(256, 8, 8) > 5.0


def test_distinct_ranks_skewed_close_to_monte_carlo():
    E, k, R = 64, 6, 8
    rng = random.Random(0)
    w = [1.0 / (i + 1) ** 0.8 for i in range(E)]
    rng.shuffle(w)
    probs = [x / sum(w) for x in w]
    trials, total = 20000, 0
    for _ in range(trials):  # weighted sampling without replacement
        keys = sorted(range(E), key=lambda i: -rng.random() ** (1.0 / probs[i]))
        total += len({x // (E // R) for x in keys[:k]})
    mc = total / trials
    assert expected_distinct_ranks(E, k, R, expert_probs=probs) == pytest.approx(mc, rel=0.05)
    # Uniform weights reproduce the exact formula.
    assert expected_distinct_ranks(E, k, R, expert_probs=[1 / E] * E) == pytest.approx(expected_distinct_ranks(E, k, R))


def test_distinct_ranks_validation():
    with pytest.raises(ValueError, match="num_ranks=3 must divide num_experts=8"):
        expected_distinct_ranks(8, 2, 3)
    with pytest.raises(ValueError, match="top_k=9"):
        expected_distinct_ranks(8, 9, 2)


def test_a2a_bytes_patterns():
    r = RoutingSpec(num_experts=64, top_k=4)
    tb = 1000.0
    assert a2a_bytes(10, r, 1, 8, Pattern.RANK, tb) == (0.0, 0.0, 0, 0)
    # All-gather: every token to the other 7 ranks of one domain.
    intra, inter, n_i, n_o = a2a_bytes(10, r, 8, 8, Pattern.ALLGATHER, tb)
    assert (intra, inter, n_i, n_o) == (10 * 7 * tb, 0.0, 7, 0)
    # Per expert: k copies, (R-1)/R of them leave the rank.
    intra, inter, _, _ = a2a_bytes(10, r, 8, 8, Pattern.EXPERT, tb)
    assert intra == pytest.approx(10 * 4 * 7 / 8 * tb) and inter == 0
    # Per rank across 2 domains of 4: distinct ranks d, 3/8 of them in-domain non-self, 4/8 remote.
    d = expected_distinct_ranks(64, 4, 8)
    intra, inter, n_i, n_o = a2a_bytes(10, r, 8, 4, Pattern.RANK, tb)
    assert intra == pytest.approx(10 * d * 3 / 8 * tb) and inter == pytest.approx(10 * d * 4 / 8 * tb)
    assert (n_i, n_o) == (3, 4)
    # Per node: the NIC carries one copy per distinct remote node (fewer than per rank).
    _, inter_node, _, _ = a2a_bytes(10, r, 8, 4, Pattern.NODE, tb)
    assert inter_node < inter


def test_all_to_all_time_hand_computed():
    fabric = Fabric(IDEAL, IDEAL, domain_size=4)
    routing = RoutingSpec(num_experts=16, top_k=2)
    t = all_to_all_time(100, 1024, routing, 4, fabric, pattern="allgather", dispatch_dtype="bf16",
                        combine_dtype="bf16")
    expect = 100 * 3 * 2048 / 100e9  # 100 tokens x 3 peers x 2 KB at 100 GB/s
    assert t.dispatch_s == pytest.approx(expect) and t.combine_s == pytest.approx(expect)
    # A receiver that gets 1.5x the mean stretches the op by 1.5.
    t2 = all_to_all_time(100, 1024, routing, 4, fabric, pattern="allgather", dispatch_dtype="bf16",
                         recv_imbalance=1.5)
    assert t2.dispatch_s == pytest.approx(1.5 * expect)
    # FP8 dispatch halves (plus scales) the bytes of BF16.
    t3 = all_to_all_time(100, 1024, routing, 4, fabric, pattern="allgather", dispatch_dtype="fp8")
    assert t3.dispatch_s == pytest.approx(100 * 3 * (1024 + 32) / 100e9)
    with pytest.raises(ValueError, match="recv_imbalance=0.5"):
        all_to_all_time(1, 1024, routing, 4, fabric, recv_imbalance=0.5)


def test_inter_node_bandwidth_caps_time():
    # Two 8-GPU domains joined by a 50 GB/s NIC: remote half of the traffic dominates.
    nic = LinkSpec("nic", 50, 0.0, 1.0, 0.0)
    nvl = LinkSpec("nvl", 450, 0.0, 1.0, 0.0)
    routing = RoutingSpec(64, 8)
    t = all_to_all_time(1000, 7168, routing, 16, Fabric(nvl, nic, 8), pattern="rank", dispatch_dtype="bf16")
    d = expected_distinct_ranks(64, 8, 16)
    assert t.dispatch_s == pytest.approx(1000 * d * 8 / 16 * 14336 / 50e9)
    assert math.isclose(t.inter_bytes, 2 * 1000 * d * 8 / 16 * 14336)


def test_linkspec_validation_names_field():
    with pytest.raises(ValueError, match="efficiency=1.5"):
        LinkSpec("x", 10, 0.0, 1.5, 0.0)
    with pytest.raises(ValueError, match="domain_size=0"):
        Fabric(IDEAL, IDEAL, 0)
