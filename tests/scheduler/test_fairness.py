"""Per-client fairness (scheduler/fairness.py): a client queueing hundreds of sequences does not keep another out;
one client alone uses everything; shares are per host first, then per connection; prompt chunks stay within a
client's token share; nothing is lost or leaked, and outputs do not depend on it."""
from __future__ import annotations

import random

import pytest

from moelink.scheduler import ModelRunnerOutput, RequestStatus
from moelink.scheduler.fairness import MAX_PREEMPTIONS_PER_STEP, FairStep, client_parts

from tests.helpers.scheduler_sim import Sim, make_request, make_scheduler, reference_generate

A = ("host:10.0.0.1", "conn:1000")
B = ("host:10.0.0.2", "conn:2000")


def _decode_step(s, so=None):
    """Run a scheduled step with one token for every row that samples."""
    so = so or s.schedule()
    reqs = {rid: s.get_request(rid) for rid in so.num_scheduled_tokens}
    sampled = {rid: [3] for rid, r in reqs.items() if r is not None and r.num_computed_tokens >= r.num_tokens}
    s.update_from_output(so, ModelRunnerOutput(so.step_id, sampled))
    s.check_invariants()
    return so


def _admitted(so) -> set[str]:
    return {r.req_id for r in so.scheduled_new_reqs}


def _held_by(s, client) -> int:
    return sum(r.client == client for r in s.running)


def _flood(s, client, n, prefix, max_tokens=500, prompt=(1, 2, 3)):
    for i in range(n):
        s.add_request(make_request(f"{prefix}{i}", list(prompt), max_tokens=max_tokens, client=client))


def test_a_client_holding_every_slot_lets_a_newcomer_in_at_once():
    s = make_scheduler(num_blocks=4096, block_size=4, max_num_seqs=256, max_num_batched_tokens=8192)
    _flood(s, A, 4 * 64, "a")  # 4 requests of n=64: 256 sequences
    _flood(s, A, 64, "later-a")  # and more queued behind them
    _decode_step(s)
    assert _held_by(s, A) == 256  # alone: it may use everything
    for _ in range(3):
        _decode_step(s)
    s.add_request(make_request("b0", [9, 9], max_tokens=5, client=B))
    so = _decode_step(s)
    # One of A's sequences (its latest) gave its slot back; B's request runs in the same step.
    assert "b0" in _admitted(so) and so.preempted_req_ids == {"a255"}
    assert s.get_request("a255").status is RequestStatus.PREEMPTED and _held_by(s, A) == 255
    for _ in range(5):
        _decode_step(s)
    assert s.get_request("b0") is None  # finished: 5 tokens
    _decode_step(s)
    assert _held_by(s, A) == 256  # its slot went back to A (work-conserving), the preempted one first
    assert s.get_request("a255").status is RequestStatus.RUNNING


def test_without_preemption_a_newcomer_overtakes_the_queue_when_a_slot_frees():
    s = make_scheduler(num_blocks=4096, block_size=4, max_num_seqs=256, max_num_batched_tokens=8192,
                       client_fair_preemption=False)
    for i in range(256):  # one slot frees per step from the 20th on
        s.add_request(make_request(f"a{i}", [1, 2, 3], max_tokens=20 + i, client=A))
    _flood(s, A, 256, "later-a", max_tokens=20)
    _decode_step(s)
    s.add_request(make_request("b0", [9, 9], max_tokens=5, client=B))
    for step in range(40):
        so = _decode_step(s)
        if "b0" in _admitted(so):
            break
    # a0 finishes with its 20th token: its slot goes to B, ahead of the 256 sequences A queued before.
    assert step == 19 and _admitted(so) == {"b0"}


def test_two_heavy_clients_converge_to_half_each_without_ping_pong():
    s = make_scheduler(num_blocks=8192, block_size=4, max_num_seqs=64, max_num_batched_tokens=8192)
    _flood(s, A, 200, "a")
    _decode_step(s)
    _flood(s, B, 200, "b")
    held = []
    preempted = 0
    for _ in range(12):
        so = _decode_step(s)
        assert len(so.preempted_req_ids) <= MAX_PREEMPTIONS_PER_STEP
        preempted += len(so.preempted_req_ids)
        held.append((_held_by(s, A), _held_by(s, B)))
    assert held[-1] == (32, 32) and held[-4:] == [(32, 32)] * 4
    assert preempted == 32  # exactly the slots that moved


def test_more_connections_from_one_host_do_not_buy_more_slots():
    assert client_parts([("host:x", "conn:1"), ("host:x", "conn:2"), ("host:y", "conn:3")]) == {
        ("host:x", "conn:1"): 0.25, ("host:x", "conn:2"): 0.25, ("host:y", "conn:3"): 0.5}
    assert client_parts([(), ("user:u",)]) == {(): 0.5, ("user:u",): 0.5}
    s = make_scheduler(num_blocks=8192, block_size=4, max_num_seqs=40, max_num_batched_tokens=8192)
    sybils = [("host:10.0.0.1", f"conn:{i}") for i in range(10)]
    for c in sybils:
        _flood(s, c, 20, f"{c[1]}-")
    _decode_step(s)
    _flood(s, B, 40, "b")
    for _ in range(6):
        _decode_step(s)
    assert _held_by(s, B) == 20  # half: the ten connections of one host share the other half
    assert sum(_held_by(s, c) for c in sybils) == 20


def test_prompt_chunks_stay_within_the_token_share_while_another_client_is_served():
    s = make_scheduler(num_blocks=1024, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=2048)
    s.add_request(make_request("b0", [5, 6], max_tokens=100, client=B))
    _decode_step(s)
    s.add_request(make_request("long", list(range(1, 400)), max_tokens=4, client=A))
    for _ in range(4):
        so = _decode_step(s)
        # A's share is 32 tokens of 64; B's decode keeps coming every step.
        assert so.num_scheduled_tokens["long"] == 32 and so.num_scheduled_tokens["b0"] == 1
    alone = make_scheduler(num_blocks=1024, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                           max_model_len=2048)
    alone.add_request(make_request("long", list(range(1, 400)), max_tokens=4, client=A))
    assert alone.schedule().num_scheduled_tokens["long"] == 64  # alone: the whole budget


def test_under_kv_pressure_the_heaviest_client_gives_way_not_the_newcomer():
    # 40 blocks of 4 tokens: A's 8 long requests outgrow the pool; B's request came last.
    s = make_scheduler(num_blocks=40, block_size=4, max_num_seqs=16, max_num_batched_tokens=64)
    _flood(s, A, 8, "a", max_tokens=60)
    _decode_step(s)
    s.add_request(make_request("b0", [9, 9], max_tokens=30, client=B))
    preempted = set()
    for step in range(40):
        so = _decode_step(s)
        preempted |= so.preempted_req_ids
        if s.get_request("b0") is None:
            break
    assert preempted and "b0" not in preempted  # KV preemptions happened, always of A's
    assert step == 29  # B's 30 tokens, one a step, never pushed out
    fcfs = make_scheduler(num_blocks=40, block_size=4, max_num_seqs=16, max_num_batched_tokens=64,
                          client_fairness=False)
    _flood(fcfs, A, 8, "a", max_tokens=60)
    _decode_step(fcfs)
    fcfs.add_request(make_request("b0", [9, 9], max_tokens=30, client=B))
    assert any("b0" in _decode_step(fcfs).preempted_req_ids for _ in range(40))  # the latest arrival goes first


def test_fairness_off_is_first_come_first_served():
    s = make_scheduler(num_blocks=4096, block_size=4, max_num_seqs=16, max_num_batched_tokens=8192,
                       client_fairness=False)
    _flood(s, A, 32, "a")
    _decode_step(s)
    s.add_request(make_request("b0", [9, 9], max_tokens=5, client=B))
    so = _decode_step(s)
    assert not so.preempted_req_ids and "b0" not in _admitted(so) and _held_by(s, A) == 16


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_random_clients_lose_nothing_and_leak_nothing(seed, overlap, monkeypatch):
    """Clients arriving and leaving at random, KV pressure, aborts: every request's output is the unbatched
    oracle's, the client counts stay right (check_invariants), and every block comes back."""
    moves = []
    preempt = FairStep._preempt
    monkeypatch.setattr(FairStep, "_preempt", lambda self, req, out: (moves.append(req), preempt(self, req, out)))
    rng = random.Random(seed)
    kv_pressure = seed % 2  # odd seeds: a small pool, KV preemptions beside the fair-share ones
    s = make_scheduler(num_blocks=60 if kv_pressure else rng.choice([400, 1000]), block_size=4,
                       max_num_seqs=rng.choice([4, 8, 16]),
                       max_num_batched_tokens=rng.choice([16, 32, 64]))
    sim = Sim(s, overlap=overlap)
    clients = [(f"host:{h}", f"conn:{c}") for h in range(3) for c in range(2)] + [()]
    want, aborted = {}, set()
    n = 0
    for step in range(400):
        if step < 200 and rng.random() < 0.5:
            heavy = rng.random() < 0.2  # a burst from one client (the slots it takes are owed back to others)
            client = rng.choice(clients)
            for _ in range(rng.randint(8, 20) if heavy else rng.randint(1, 3)):
                rid = f"r{n}"
                n += 1
                prompt = [rng.randrange(1, 50) for _ in range(rng.randint(1, 30))]
                mt = rng.randint(1, 25)
                s.add_request(make_request(rid, prompt, max_tokens=mt, client=client if heavy else rng.choice(clients)))
                want[rid] = reference_generate(prompt, max_tokens=mt)
        if rng.random() < 0.05 and s.requests:
            rid = rng.choice(sorted(s.requests))
            s.finish_requests(rid, RequestStatus.FINISHED_ABORTED)
            aborted.add(rid)
        sim.step()
        if step >= 200 and not s.has_unfinished_requests():
            break
    sim.run()
    for rid, (tokens, reason) in want.items():
        if rid in aborted:
            assert sim.tokens[rid] == tokens[:len(sim.tokens[rid])]
        else:
            assert (sim.tokens[rid], sim.finish[rid]) == (tokens, reason), rid
    assert s.fairness.counts == {}
    assert moves or kv_pressure  # fair-share preemptions happened
