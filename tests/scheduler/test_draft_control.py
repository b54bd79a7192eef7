"""Adaptive draft length and the per-step verify budget (scheduler/draft_control.py): drafts that keep failing
shrink a request's draft length to 0 within a few steps and acceptances bring it back; a step's verify rows never
exceed its budget; the requests with the higher acceptance get their drafts first."""
from __future__ import annotations

import random

import pytest

from moelink.scheduler import ModelRunnerOutput, SchedulerConfig
from moelink.scheduler.draft_control import MAX_PROBE_BACKOFF, DraftControl

from tests.helpers.scheduler_sim import make_request, make_scheduler

DRAFT = [7, 8, 9]  # the worker proposes these every step (k = 3)


def _start(s, rid="a", prompt=(1, 2, 3), max_tokens=400, **kw):
    s.add_request(make_request(rid, list(prompt), max_tokens=max_tokens, **kw))


def _run_step(s, accept) -> dict[str, int]:
    """One step: each verifying request accepts `accept(rid, k)` of its k drafts; every running request is given
    DRAFT for its next step. Returns the drafts each request verified."""
    so = s.schedule()
    sampled = {}
    for rid in so.num_scheduled_tokens:
        req = s.get_request(rid)
        if req.num_computed_tokens < req.num_tokens:
            continue  # a prompt chunk that samples nothing
        k = len(so.scheduled_spec_tokens.get(rid, ()))
        a = accept(rid, k) if k else 0
        sampled[rid] = [*so.scheduled_spec_tokens.get(rid, [])[:a], 5]
    s.update_from_output(so, ModelRunnerOutput(so.step_id, sampled,
                                               draft_token_ids={rid: list(DRAFT) for rid in sampled}))
    s.check_invariants()
    return {rid: len(d) for rid, d in so.scheduled_spec_tokens.items()}


def test_always_rejected_drafts_shrink_to_zero_and_come_back_when_accepted():
    s = make_scheduler(num_blocks=256, block_size=4, spec_probe_interval=4)
    _start(s)
    _run_step(s, None)  # the prefill: drafts proposed
    lengths = [_run_step(s, lambda rid, k: 0).get("a", 0) for _ in range(6)]
    # p = 1 (a new request drafts in full), then 1/2 (0.5 >= 0.3 > 0.25: one draft), then 1/4: none, for
    # spec_probe_interval = 4 steps.
    assert lengths == [3, 1, 0, 0, 0, 0]
    req = s.get_request("a")
    assert req.draft_probe_interval == 4
    # Then one draft (the probe), rejected: the wait doubles, and again.
    lengths = [_run_step(s, lambda rid, k: 0).get("a", 0) for _ in range(1 + 8 + 1)]
    assert lengths == [1] + [0] * 8 + [1] and req.draft_probe_interval == 16
    # Drafts are right again: the next probe is accepted and the length climbs back to the whole proposal.
    lengths = [_run_step(s, lambda rid, k: k).get("a", 0) for _ in range(24)]
    assert lengths[:17] == [0] * 16 + [1] and lengths[-3:] == [3, 3, 3] and req.draft_probe_interval == 0
    # All of it exact: every output token came from a verify row or a plain decode, in order.
    assert len(req.output_token_ids) == req.num_computed_tokens + 1 - req.num_prompt_tokens


def test_probe_backoff_is_capped():
    dc = DraftControl(SchedulerConfig(spec_probe_interval=2))
    req = make_request("a", [1, 2])
    for _ in range(10):
        dc.observe(req, 1, 0)
    assert req.draft_probe_interval == 2 * MAX_PROBE_BACKOFF and req.draft_probe_wait == 2 * MAX_PROBE_BACKOFF


def test_length_follows_the_estimated_acceptance():
    dc = DraftControl(SchedulerConfig(spec_min_draft_acceptance=0.3))
    req = make_request("a", [1, 2])
    req.draft_accepted, req.draft_tried = 0.8, 1.0  # 0.8^5 = 0.33 >= 0.3 > 0.8^6
    assert dc.length(req, 8) == 5 and dc.length(req, 3) == 3
    req.draft_accepted = 0.3
    assert dc.length(req, 8) == 1
    off = DraftControl(SchedulerConfig(spec_min_draft_acceptance=0.0))
    req.draft_accepted = 0.0
    assert off.length(req, 4) == 4  # adaptation off: every proposed draft


def test_the_estimate_is_accepted_over_tried():
    dc = DraftControl(SchedulerConfig())
    req = make_request("a", [1, 2])
    dc.observe(req, 4, 1)  # 1 accepted, the 2nd rejected: 2 tried (the 3rd and 4th say nothing)
    assert (req.draft_accepted, req.draft_tried) == (1.0, 1.5)
    dc.observe(req, 2, 2)  # all accepted: 2 tried
    assert (req.draft_accepted, req.draft_tried) == (1.5, 1.75)


@pytest.mark.parametrize("seed", range(4))
def test_verify_rows_never_exceed_the_step_budget(seed):
    rng = random.Random(seed)
    budget, frac = 40, 0.5
    s = make_scheduler(num_blocks=2000, block_size=4, max_num_seqs=24, max_num_batched_tokens=budget,
                       spec_max_verify_fraction=frac, spec_probe_interval=2)
    good = {f"r{i}": rng.random() for i in range(24)}  # each request's chance to accept one draft
    for rid in good:
        _start(s, rid, prompt=[rng.randrange(1, 50) for _ in range(rng.randint(1, 12))], max_tokens=60)

    def accept(rid, k):
        a = 0
        while a < k and rng.random() < good[rid]:
            a += 1
        return a

    verified_by_good, verified_by_bad = 0, 0
    for _ in range(80):
        running = len(s.running)
        got = _run_step(s, accept)
        assert sum(got.values()) <= min(int(frac * budget), budget - running)
        verified_by_good += sum(k for rid, k in got.items() if good[rid] > 0.8)
        verified_by_bad += sum(k for rid, k in got.items() if good[rid] < 0.2)
        if not s.has_unfinished_requests():
            break
    assert verified_by_good > 3 * verified_by_bad


def test_higher_acceptance_gets_its_drafts_first():
    # Budget 8, 2 running, fraction 1: 6 rows of drafts for 2 x 3 wanted; "b" has the higher estimate.
    s = make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=8, spec_max_verify_fraction=1.0)
    _start(s, "a")
    _start(s, "b")
    _run_step(s, None)
    s.get_request("a").draft_accepted = 0.8
    s.get_request("b").draft_accepted = 0.9
    so = s.schedule()
    assert {rid: len(d) for rid, d in so.scheduled_spec_tokens.items()} == {"b": 3, "a": 3}
    s = make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=6, spec_max_verify_fraction=1.0)
    _start(s, "a")
    _start(s, "b")
    _run_step(s, None)
    s.get_request("a").draft_accepted = 0.8
    s.get_request("b").draft_accepted = 0.9
    so = s.schedule()  # 4 rows for drafts: "b" takes its 3, "a" the last one
    assert {rid: len(d) for rid, d in so.scheduled_spec_tokens.items()} == {"b": 3, "a": 1}


@pytest.mark.parametrize("kwargs, message", [
    ({"spec_min_draft_acceptance": 1.0}, "SchedulerConfig.spec_min_draft_acceptance=1.0 is invalid: must be a "
                                         "number in [0, 1) (0: verify every draft)."),
    ({"spec_min_draft_acceptance": -0.1}, "SchedulerConfig.spec_min_draft_acceptance=-0.1 is invalid"),
    ({"spec_min_draft_acceptance": float("nan")}, "SchedulerConfig.spec_min_draft_acceptance=nan is invalid"),
    ({"spec_max_verify_fraction": 0}, "SchedulerConfig.spec_max_verify_fraction=0 is invalid: must be a number "
                                      "in (0, 1]."),
    ({"spec_max_verify_fraction": True}, "SchedulerConfig.spec_max_verify_fraction=True is invalid"),
    ({"spec_probe_interval": 0}, "SchedulerConfig.spec_probe_interval=0 is invalid: must be a positive integer."),
    ({"client_fairness": 1}, "SchedulerConfig.client_fairness=1 is invalid: must be True or False."),
    ({"client_fair_preemption": None}, "SchedulerConfig.client_fair_preemption=None is invalid"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError) as e:
        SchedulerConfig(**kwargs)
    assert str(e.value).startswith(message)


def test_a_new_request_starts_from_its_clients_record():
    """A client whose drafts always fail cannot reset the cost with fresh requests: each new one starts from the
    client's record (one probe draft, then plain), while another client's new request drafts in full."""
    bad, good = ("host:a", "conn:1"), ("host:b", "conn:2")
    s = make_scheduler(num_blocks=1024, block_size=4, max_num_seqs=16, max_num_batched_tokens=256)
    first = []
    for i in range(12):  # short requests, one after the other
        _start(s, f"bad{i}", max_tokens=6, client=bad)
        lengths = [_run_step(s, lambda rid, k: 0).get(f"bad{i}", 0) for _ in range(6)]
        first.append(next((n for n in lengths if n), 0))
        assert s.get_request(f"bad{i}") is None
    assert first[0] == 3 and max(first[-4:]) <= 1
    _start(s, "good0", max_tokens=6, client=good)
    assert [_run_step(s, lambda rid, k: k).get("good0", 0) for _ in range(2)] == [0, 3]  # prefill, then all 3
    assert set(s.draft_control.clients) == {bad, good}


def test_the_worker_is_told_not_to_draft_for_a_request_waiting_for_its_probe():
    s = make_scheduler(num_blocks=256, block_size=4, spec_probe_interval=3)
    _start(s)
    _run_step(s, None)
    skipped = []
    for _ in range(10):
        so = s.schedule()
        skipped.append("a" in so.no_draft_req_ids)
        k = len(so.scheduled_spec_tokens.get("a", ()))
        s.update_from_output(so, ModelRunnerOutput(so.step_id, {"a": [5]}, draft_token_ids={"a": list(DRAFT)}))
        skipped[-1] = (k, skipped[-1])
    # 3 and 1 drafts rejected; then 3 steps without (the first two need no drafts after them, the third's feed the
    # probe), the probe, rejected: 6 steps without.
    assert skipped == [(3, False), (1, False), (0, True), (0, True), (0, False), (1, False), (0, True), (0, True),
                       (0, True), (0, True)]
