"""engine/elastic.survivor_placement: the EP N-1 placement after a loss moves the least."""
import pytest

from moelink.engine.cluster.elastic import SurvivorPlacement, survivor_placement
from moelink.moe.placement import ExpertPlacement


def test_survivors_keep_their_experts_and_orphans_go_to_the_least_loaded():
    old = ExpertPlacement(num_experts=10, ep_size=4)  # [0 1 2] [3 4 5] [6 7] [8 9]
    new = survivor_placement(old, [0, 1, 3])  # rank 2 lost: 6 and 7 orphaned
    slots = [new.experts_on_rank(r) for r in range(3)]
    assert slots == [[0, 1, 2, 7], [3, 4, 5], [8, 9, 6]]  # 6 to the rank with 2 slots, then 7 to the first of 3
    assert new.num_redundant == 0 and new.ep_size == 3
    assert all(len(reps) == 1 for reps in new.log2phy)


def test_replicas_on_survivors_serve_the_lost_ranks_experts_first():
    old = ExpertPlacement(num_experts=4, ep_size=3, replicas=[2, 3])  # [0 1 2'] .. copies of 2 and 3 elsewhere
    lost = 1
    new = survivor_placement(old, [r for r in range(3) if r != lost])
    before = [old.experts_on_rank(r) for r in (0, 2)]
    after = [new.experts_on_rank(r) for r in range(2)]
    for b, a in zip(before, after):
        assert a[:len(b)] == b  # kept, in local slot order
    orphans = set(old.experts_on_rank(lost)) - {e for b in before for e in b}
    assert sum(len(a) - len(b) for a, b in zip(after, before)) == len(orphans)  # only orphans are added
    assert sorted({e for a in after for e in a}) == [0, 1, 2, 3]


def test_survivor_placement_validates_its_slots():
    with pytest.raises(ValueError, match="expert 3 is held by no rank"):
        SurvivorPlacement(num_experts=4, ep_size=2, given_slots=((0, 1), (2,)))
    with pytest.raises(ValueError, match=r"rank 1 holds \(2, 2\)"):
        SurvivorPlacement(num_experts=3, ep_size=2, given_slots=((0, 1), (2, 2)))
    with pytest.raises(ValueError, match="given_slots has 1 ranks, ep_size=2"):
        SurvivorPlacement(num_experts=2, ep_size=1 + 1, given_slots=((0, 1),))
