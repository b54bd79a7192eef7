"""ExpertPlacement: layouts worked out by hand, redundant replicas, the device tables, and validation."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from moelink.moe.placement import ExpertPlacement


def _layout(p: ExpertPlacement) -> list[list[int]]:
    return [p.experts_on_rank(r) for r in range(p.ep_size)]


def test_even_contiguous():
    p = ExpertPlacement(num_experts=8, ep_size=4)
    assert _layout(p) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert p.num_physical_experts == 8 and p.num_redundant == 0 and p.replicas == ()
    assert p.expert_map(2) == [-1, -1, -1, -1, 0, 1, -1, -1]
    assert p.log2phy[5] == [(2, 1)]


def test_uneven_first_ranks_take_the_extra_experts():
    # 6 experts on 4 ranks: 2, 2, 1, 1.
    p = ExpertPlacement(num_experts=6, ep_size=4)
    assert _layout(p) == [[0, 1], [2, 3], [4], [5]]
    assert [p.num_local_experts(r) for r in range(4)] == [2, 2, 1, 1]
    assert [p.slot_offset(r) for r in range(4)] == [0, 2, 4, 5]
    assert [p.rank_of_slot(s) for s in range(6)] == [0, 0, 1, 1, 2, 3]
    assert p.phy2log == [0, 1, 2, 3, 4, 5]
    assert p.expert_map(3) == [-1, -1, -1, -1, -1, 0]
    assert p.max_local_experts == 2
    # 5 experts on 2 ranks: 3, 2.
    assert _layout(ExpertPlacement(num_experts=5, ep_size=2)) == [[0, 1, 2], [3, 4]]


def test_round_robin():
    p = ExpertPlacement(num_experts=6, ep_size=4, policy="round_robin")
    assert _layout(p) == [[0, 4], [1, 5], [2], [3]]
    assert p.expert_map(1) == [-1, 0, -1, -1, -1, 1]


def test_hot_replicas_go_to_the_least_loaded_ranks():
    # Primaries [0 1] [2 3] [4] [5]. First copy of 5 → rank 2 (1 slot; rank 3 already holds 5).
    # Second copy of 5 → rank 0 (ranks 2, 3 hold 5; ranks 0, 1 tie at 2 slots, lowest wins).
    # Copy of 0 → rank 3 (the only rank left with 1 slot, and it lacks 0).
    p = ExpertPlacement(num_experts=6, ep_size=4, replicas=[5, 5, 0])
    assert _layout(p) == [[0, 1, 5], [2, 3], [4, 5], [5, 0]]
    assert p.num_redundant == 3 and p.num_physical_experts == 9
    assert p.log2phy[5] == [(0, 2), (2, 1), (3, 0)]
    assert p.log2phy[0] == [(0, 0), (3, 1)]
    assert p.phy2log == [0, 1, 5, 2, 3, 4, 5, 5, 0]
    assert p.expert_map(3) == [1, -1, -1, -1, -1, 0]


def test_replicas_as_dict_and_num_redundant_agreement():
    a = ExpertPlacement(num_experts=6, ep_size=4, replicas={5: 2, 0: 1})
    # A dict flattens in expert-id order: (0, 5, 5).
    assert a.replicas == (0, 5, 5)
    b = ExpertPlacement(num_experts=6, ep_size=4, num_redundant=3, replicas=[0, 5, 5])
    assert _layout(a) == _layout(b)
    assert hash(a) == hash(b) and a == b


def test_default_redundant_slots_stay_even():
    # No hot list yet: each extra slot goes to the least-loaded rank, copying an expert it lacks.
    p = ExpertPlacement(num_experts=8, ep_size=2, num_redundant=2)
    assert _layout(p) == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 0]]
    assert p.replicas == (4, 0)
    p = ExpertPlacement(num_experts=6, ep_size=4, num_redundant=2)
    assert [p.num_local_experts(r) for r in range(4)] == [2, 2, 2, 2]
    # Fewer experts than ranks is fine once replicas fill every rank.
    assert _layout(ExpertPlacement(num_experts=2, ep_size=4, num_redundant=2)) == [[0], [1], [0], [1]]


def test_to_tensors():
    p = ExpertPlacement(num_experts=4, ep_size=2, replicas=[0])  # r0: 0, 1 | r1: 2, 3, 0
    t = p.to_tensors("cpu")
    assert t.ep_size == 2 and t.num_experts == 4 and t.max_replicas == 2
    assert t.replica_count_G.dtype == t.replica_rank_GX.dtype == t.replica_slot_GX.dtype == torch.int32
    assert t.replica_count_G.tolist() == [2, 1, 1, 1]
    assert t.replica_rank_GX.tolist() == [[0, 1], [0, -1], [1, -1], [1, -1]]
    assert t.replica_slot_GX.tolist() == [[0, 2], [1, -1], [0, -1], [1, -1]]
    assert p.expert_map_tensor(1).tolist() == [2, -1, 0, 1]
    assert p.expert_map_tensor(1).dtype == torch.int32


def test_frozen():
    p = ExpertPlacement(num_experts=4, ep_size=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.ep_size = 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_experts=0, ep_size=1), r"num_experts must be an integer >= 1, got 0"),
    (dict(num_experts=4.0, ep_size=1), r"num_experts must be an integer"),
    (dict(num_experts=4, ep_size=0), r"ep_size must be an integer >= 1, got 0"),
    (dict(num_experts=4, ep_size=True), r"ep_size must be an integer"),
    (dict(num_experts=4, ep_size=2, num_redundant=-1), r"num_redundant must be an integer >= 0"),
    (dict(num_experts=4, ep_size=2, policy="linear"), r"policy must be one of \('contiguous', 'round_robin'\), got 'linear'"),
    (dict(num_experts=4, ep_size=2, replicas=[4]), r"replicas holds expert id 4.*\[0, 4\)"),
    (dict(num_experts=4, ep_size=2, replicas="01"), r"replicas must be a list of expert ids or a dict"),
    (dict(num_experts=4, ep_size=2, replicas={1: 0}), r"replicas\[1\] \(extra copies\) must be an integer >= 1"),
    (dict(num_experts=4, ep_size=2, replicas=[0, 0]), r"replicas asks for 3 copies of expert 0.*at most 2"),
    (dict(num_experts=4, ep_size=2, num_redundant=2, replicas=[1]), r"num_redundant=2 does not match replicas"),
    (dict(num_experts=2, ep_size=4), r"rank 2 would hold no expert"),
    (dict(num_experts=2, ep_size=2, num_redundant=3), r"num_redundant=3 is too many"),
])
def test_validation_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExpertPlacement(**kwargs)


@pytest.mark.parametrize("call", [lambda p: p.experts_on_rank(2), lambda p: p.expert_map(-1),
                                  lambda p: p.num_local_experts(5), lambda p: p.rank_of_slot(4)])
def test_out_of_range_queries(call):
    with pytest.raises(ValueError, match=r"(rank|slot) must be an integer in"):
        call(ExpertPlacement(num_experts=4, ep_size=2))


@pytest.mark.parametrize("G, R, extra", [(1, 1, 0), (7, 3, 0), (16, 5, 3), (6, 4, 5), (3, 8, 5), (128, 8, 16)])
def test_invariants(G, R, extra):
    p = ExpertPlacement(num_experts=G, ep_size=R, num_redundant=extra)
    counts = [p.num_local_experts(r) for r in range(R)]
    assert sum(counts) == G + extra and min(counts) >= 1
    assert max(counts) - min(counts) <= 1  # default replicas keep slots even
    log2phy = p.log2phy
    assert all(len(reps) >= 1 for reps in log2phy)
    for r in range(R):
        local = p.experts_on_rank(r)
        assert len(set(local)) == len(local)  # never two copies of one expert on a rank
        emap = p.expert_map(r)
        assert all(emap[e] == i for i, e in enumerate(local))
        assert sum(v >= 0 for v in emap) == len(local)
    for e, reps in enumerate(log2phy):
        assert all(p.experts_on_rank(r)[s] == e for r, s in reps)
        assert p.phy2log[p.slot_offset(reps[0][0]) + reps[0][1]] == e
