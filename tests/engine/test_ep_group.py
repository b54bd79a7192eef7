"""The EP group's membership value (engine/cluster/ep_group.py): validated, changed only into a new epoch."""
from __future__ import annotations

import pytest

from moelink.engine.cluster.ep_group import EPGroup


def group(n=4, **kw):
    return EPGroup(0, "cfg", "plan", tuple(range(n)), workers=tuple(f"w{r}" for r in range(n)),
                   rank_pids=tuple(100 + r for r in range(n)), node_ids=tuple(f"n{r // 2}" for r in range(n)),
                   master_addr="127.0.0.1", master_port=1234, **kw)


def test_one_entry_per_rank_or_none():
    assert group().world_size == 4
    assert EPGroup(0, "cfg", "plan", (0, 1)).workers == ()  # being started: no actors yet
    with pytest.raises(ValueError, match=r"EPGroup.rank_pids has 3 entries: it must have one per rank \(4\)"):
        EPGroup(0, "cfg", "plan", (0, 1, 2, 3), rank_pids=(1, 2, 3))
    with pytest.raises(ValueError, match="EPGroup.bundles=.* at least one rank"):
        EPGroup(0, "cfg", "plan", ())


def test_survivors_keep_their_actor_process_bundle_and_node():
    g = group()
    s = g.survivors([0, 2, 3], "cfg3", "plan3", "127.0.0.2", 99)
    assert (s.epoch, s.world_size, s.config, s.plan) == (1, 3, "cfg3", "plan3")
    assert s.workers == ("w0", "w2", "w3") and s.rank_pids == (100, 102, 103) and s.bundles == (0, 2, 3)
    assert s.node_ids == ("n0", "n1", "n1") and (s.master_addr, s.master_port) == ("127.0.0.2", 99)
    assert g.world_size == 4 and g.epoch == 0  # the old group is a value: unchanged
    # Node ids re-derived by the caller replace the picked ones.
    assert g.survivors([1, 3], "c", "p", "a", 1, node_ids=["x", "y"]).node_ids == ("x", "y")


def test_next_counts_epochs():
    g = group()
    back = g.survivors([0, 1, 2], "c", "p", "a", 1).next(bundles=(0, 1, 2, 3), workers=g.workers,
                                                          rank_pids=(100, 101, 102, 200), node_ids=g.node_ids)
    assert back.epoch == 2 and back.world_size == 4 and back.rank_pids[3] == 200
