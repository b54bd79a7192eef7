"""A lost rank is named by what it is (issue 53 low 4): a TP-only server said "expert-parallel rank 1 died",
though it has no expert parallelism. engine/cluster/executor.rank_name, and the Ray state's errors that use it."""
from __future__ import annotations

import pytest

from moelink.engine.cluster.executor import WorkerDiedError, rank_name
from moelink.engine.cluster.ray_runtime import _RayState


@pytest.mark.parametrize("rank, tp, ep, name", [
    (1, 1, 4, "expert-parallel rank 1"),  # EP only: what it always said
    (1, 2, 1, "tensor-parallel rank 1"),  # -tp 2 alone: one TP group, the experts split over it
    (3, 4, 1, "tensor-parallel rank 3"),
    (3, 2, 4, "rank 3 (TP group 1)"),  # -tp 2 -ep 4: two TP groups, experts in EP over the world
    (1, 2, 2, "rank 1 (TP group 0)"),  # what -tp 2 -ep 4 shrinks to after losing a group
    (0, 1, 1, "rank 0"),  # one rank on Ray: neither
])
def test_rank_name_says_what_the_rank_is(rank, tp, ep, name):
    assert rank_name(rank, tp, ep) == name


def test_the_ray_states_loss_messages_use_its_layout():
    state = _RayState()
    state.tp, state.ep = 2, 1
    err = state.died(1, "its actor died (ActorDiedError)")
    assert str(err) == "tensor-parallel rank 1 died: its actor died (ActorDiedError)"
    assert "expert-parallel" not in str(err) and (err.rank, err.what, err.name) == (1, "died", "tensor-parallel rank 1")
    state.tp, state.ep = 2, 4
    assert str(state.died(3, "no heartbeat", "is not responding")) == \
        "rank 3 (TP group 1) is not responding: no heartbeat"
    state.tp, state.ep = 1, 4
    assert str(state.died(2, "x")) == "expert-parallel rank 2 died: x"


def test_an_error_built_without_a_layout_keeps_the_ep_name():
    assert str(WorkerDiedError(2, "gone")) == "expert-parallel rank 2 died: gone"
    assert str(WorkerDiedError(1, "gone", name="tensor-parallel rank 1")) == "tensor-parallel rank 1 died: gone"
