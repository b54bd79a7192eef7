"""Issue 95: fair share over the set of a client's connections and names (scheduler/fair_tree.py). A host spreading
its load over 64 connections (or a keyed caller over a fresh x-client-id per request) held every slot with one
request per leaf, no leaf was ever "over its share", and another host's request waited a whole generation."""
from __future__ import annotations

import pytest

from moelink.scheduler import RequestStatus
from moelink.scheduler.fair_tree import ClientTree, FairPicker

from tests.helpers.scheduler_sim import make_request, make_scheduler
from tests.scheduler.test_fairness import _admitted, _decode_step, _held_by

VICTIM = ("host:10.0.0.2", "conn:2000")


def _spread(kind: str, i: int) -> tuple[str, ...]:
    return ("host:10.0.0.1", f"conn:{1000 + i}" if kind == "conn" else f"user:u{i}")


def _in_host(s, host: str) -> int:
    return sum(r.client[0] == host for r in s.running)


@pytest.mark.parametrize("kind", ["conn", "user", "one"])
def test_a_victim_from_another_host_runs_at_once_beside_a_spread_host(kind):
    s = make_scheduler(num_blocks=8192, block_size=4, max_num_seqs=64, max_num_batched_tokens=8192)
    for i in range(64):  # one long request per connection (per fresh name; or all 64 on one connection)
        client = ("host:10.0.0.1", "conn:1000") if kind == "one" else _spread(kind, i)
        s.add_request(make_request(f"a{i}", [1, 2, 3], max_tokens=500, client=client))
    _decode_step(s)
    assert _in_host(s, "host:10.0.0.1") == 64
    s.add_request(make_request("b0", [9, 9], max_tokens=5, client=VICTIM))
    so = _decode_step(s)
    # The latest of the host's requests gave its slot back; the victim runs in the same step.
    assert "b0" in _admitted(so) and so.preempted_req_ids == {"a63"}
    assert s.get_request("a63").status is RequestStatus.PREEMPTED
    for _ in range(3):  # no ping-pong: the host is at (above) its share, its preempted request waits
        so = _decode_step(s)
        assert not so.preempted_req_ids and _held_by(s, VICTIM) == 1
    _decode_step(s)
    assert s.get_request("b0") is None  # its 5 tokens done (the first came with its prompt)
    _decode_step(s)
    assert s.get_request("a63").status is RequestStatus.RUNNING  # the slot went back


@pytest.mark.parametrize("kind", ["conn", "user"])
def test_a_heavy_host_against_a_spread_host_converges_to_half_each_without_ping_pong(kind):
    s = make_scheduler(num_blocks=8192, block_size=4, max_num_seqs=64, max_num_batched_tokens=8192)
    for i in range(200):
        s.add_request(make_request(f"a{i}", [1, 2, 3], max_tokens=500, client=_spread(kind, i)))
    _decode_step(s)
    for i in range(200):
        s.add_request(make_request(f"b{i}", [9, 9], max_tokens=500, client=VICTIM))
    held, preempted = [], 0
    for _ in range(10):
        so = _decode_step(s)
        preempted += len(so.preempted_req_ids)
        held.append((_in_host(s, "host:10.0.0.1"), _held_by(s, VICTIM)))
    assert held[-4:] == [(32, 32)] * 4 and preempted == 32  # exactly the slots that moved


def test_a_name_claimed_from_another_host_does_not_join_that_client():
    # Host A's attacker names itself after the victim's user: under its own host it is another client.
    s = make_scheduler(num_blocks=8192, block_size=4, max_num_seqs=8, max_num_batched_tokens=8192)
    for i in range(8):
        s.add_request(make_request(f"a{i}", [1, 2, 3], max_tokens=500, client=("host:10.0.0.1", "user:bob")))
    _decode_step(s)
    s.add_request(make_request("b0", [9, 9], max_tokens=5, client=("host:10.0.0.2", "user:bob")))
    assert "b0" in _admitted(_decode_step(s))


def test_tree_donor_and_fair_order():
    a1, a2, b = ("host:a", "conn:1"), ("host:a", "conn:2"), ("host:b", "conn:3")
    tree = ClientTree([a1, a2, b])
    assert tree.client_parts() == {a1: 0.25, a2: 0.25, b: 0.5}
    # 8 slots: a1 holds 4, b 4. a2 waits: host a is at its share (4), so b gives nothing; a1 (4 > 2) does.
    seats = tree.totals({a1: 4, b: 4})
    movable = dict(seats)
    assert tree.donor(a2, seats, movable, 8) == a1
    # b waiting with 3 while a holds 5 (a1 4, a2 1): host a gives, from its child furthest above its share.
    seats = tree.totals({a1: 4, a2: 1, b: 3})
    assert tree.donor(b, seats, dict(seats), 8) == a1
    # At its share at every level: nobody gives (no ping-pong).
    seats = tree.totals({a1: 2, a2: 2, b: 4})
    assert tree.donor(b, seats, dict(seats), 8) is None and tree.donor(a1, seats, dict(seats), 8) is None
    # Fair order of the free slots: host b (empty) until it holds as many as host a, then host a's emptier
    # connection (a tie between the hosts goes to the one waiting first).
    picker = FairPicker(tree, tree.totals({a1: 2}), {a1: 5, a2: 5, b: 5}, {a1: 0, a2: 1, b: 2})
    got = []
    for _ in range(4):
        c, popped = picker.pick()
        got.append(c)
        picker.commit(popped, took=True)
    assert got == [b, b, a2, b]
