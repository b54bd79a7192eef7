"""Speculative decoding, the scheduler's side (scheduler/spec_decode.py): drafts a worker proposes are verified by
the request's next decode step within its limits; rejected drafts roll the computed tokens back; counters."""
from __future__ import annotations

from moelink.scheduler import ModelRunnerOutput

from tests.helpers.scheduler_sim import make_request, make_scheduler


def _step(s, so, tokens: dict, drafts: dict | None = None):
    return s.update_from_output(so, ModelRunnerOutput(so.step_id, tokens, draft_token_ids=drafts))


def _running(s, rid="a", prompt=(1, 2, 3), drafts=(7, 8, 9), **kw):
    """A request past its prefill, holding `drafts` the worker proposed with its first token (5)."""
    s.add_request(make_request(rid, list(prompt), **kw))
    so = s.schedule()
    _step(s, so, {rid: [5]}, {rid: list(drafts)})
    return s.get_request(rid)


def test_drafts_are_verified_by_the_next_step_and_rejected_ones_rolled_back():
    s = make_scheduler(num_blocks=16, block_size=4)
    req = _running(s)
    assert req.spec_token_ids == [7, 8, 9] and req.num_computed_tokens == 3
    so = s.schedule()
    assert so.num_scheduled_tokens == {"a": 4} and so.scheduled_spec_tokens == {"a": [7, 8, 9]}
    assert req.spec_token_ids == []  # taken by the step
    (out,) = _step(s, so, {"a": [7, 6]})  # first draft accepted, second rejected: 6 instead
    assert out.new_token_ids == [7, 6] and req.output_token_ids == [5, 7, 6]
    # KV of prompt + 5 + 7 is written; 6 is not yet (the rejected drafts' slots are overwritten later).
    assert req.num_computed_tokens == 5 == len(req.all_token_ids) - 1
    c = s.spec_counters
    assert (c.num_verify_rows, c.num_draft_tokens, c.num_accepted_tokens, c.accepted_per_position) == (1, 3, 1, [1, 0, 0])
    assert s.stats().spec_decode.mean_accepted_length == 2.0
    so = s.schedule()  # no drafts proposed this time: an ordinary decode
    assert so.num_scheduled_tokens == {"a": 1} and so.scheduled_spec_tokens == {}
    s.check_invariants()


def test_all_drafts_accepted_gives_k_plus_one_tokens():
    s = make_scheduler(num_blocks=16, block_size=4)
    req = _running(s, drafts=(7, 8))
    so = s.schedule()
    (out,) = _step(s, so, {"a": [7, 8, 4]}, {"a": [1]})
    assert out.new_token_ids == [7, 8, 4] and req.num_computed_tokens == len(req.all_token_ids) - 1
    assert req.spec_token_ids == [1]
    assert s.spec_counters.accepted_per_position == [1, 1]
    s.check_invariants()


def test_verified_drafts_stay_within_max_tokens_max_model_len_and_the_budget():
    s = make_scheduler(num_blocks=16, block_size=4)
    req = _running(s, max_tokens=3)  # one output so far: room for 2 more, so 1 draft + its successor
    so = s.schedule()
    assert so.scheduled_spec_tokens == {"a": [7]} and so.num_scheduled_tokens == {"a": 2}
    (out,) = _step(s, so, {"a": [7, 2]})
    assert out.finish_reason == "length" and req.output_token_ids == [5, 7, 2]
    # The whole token budget open to drafts (by default only half of it: scheduler/draft_control.py).
    s = make_scheduler(num_blocks=16, block_size=4, max_num_batched_tokens=3, spec_max_verify_fraction=1.0)
    _running(s, rid="b", drafts=(7, 8, 9, 10))
    assert s.schedule().scheduled_spec_tokens == {"b": [7, 8]}  # 1 + 2 drafts = the budget of 3


def test_a_stop_token_among_the_accepted_ends_the_request():
    s = make_scheduler(num_blocks=16, block_size=4)
    _running(s, stop_token_ids={8})
    so = s.schedule()
    (out,) = _step(s, so, {"a": [7, 8, 9, 3]})
    assert out.new_token_ids == [7, 8] and out.finish_reason == "stop"
    assert s.get_request("a") is None and s.kv.pool.num_free_blocks == 16
    s.check_invariants()


def test_a_preempted_request_forgets_its_drafts():
    s = make_scheduler(num_blocks=16, block_size=4)
    req = _running(s)
    s._preempt(s.running.pop())
    assert req.spec_token_ids == []
