"""A step that emits several tokens for a request (speculative decoding's accepted drafts): the scheduler appends
each, checks the stop rules on each, stops at the first that ends the request, and keeps the overlapped loop's
placeholders consistent (scheduler/step_output.py)."""
import random

import pytest

from moelink.scheduler import ModelRunnerOutput, RequestStatus, TokenLogprobs

from tests.helpers.scheduler_sim import Sim, make_request, make_scheduler, reference_generate


def _lp(tokens):
    return [TokenLogprobs(t, -0.5, 1, [(t, -0.5)]) for t in tokens]


def _prefill(s, req):
    s.add_request(req)
    so = s.schedule()
    assert so.num_scheduled_tokens == {req.request_id: req.num_tokens}
    return so


def _take(s, so, tokens, rid="a"):
    return s.update_from_output(so, ModelRunnerOutput(so.step_id, {rid: tokens}, {rid: _lp(tokens)}))


def test_all_tokens_accepted_and_their_kv_computed_next():
    s = make_scheduler(block_size=4)
    so = _prefill(s, make_request("a", [1, 2, 3], max_tokens=10))
    (out,) = _take(s, so, [5, 6, 7])
    assert out.new_token_ids == [5, 6, 7] and [lp.token_id for lp in out.new_logprobs] == [5, 6, 7]
    assert out.finish_reason is None
    req = s.get_request("a")
    assert req.output_token_ids == [5, 6, 7] and req.all_token_ids == [1, 2, 3, 5, 6, 7]
    assert req.num_output_placeholders == 0
    s.check_invariants()
    # The two tokens after the first have no KV yet: the next step computes all three, and samples.
    so = s.schedule()
    assert so.num_scheduled_tokens == {"a": 3}
    assert so.scheduled_cached_reqs[0].num_computed_tokens == 3 and req.num_output_placeholders == 1
    (out,) = _take(s, so, [8])
    assert req.output_token_ids == [5, 6, 7, 8]
    s.check_invariants()


@pytest.mark.parametrize("kind", ["stop_id", "eos"])
def test_a_stop_token_mid_list_ends_the_request_and_drops_the_rest(kind):
    s = make_scheduler(num_blocks=16, block_size=4)
    kw = dict(stop_token_ids={6}) if kind == "stop_id" else dict(eos_token_ids={6})
    so = _prefill(s, make_request("a", [1, 2, 3], max_tokens=10, **kw))
    (out,) = _take(s, so, [5, 6, 7, 8])
    assert out.new_token_ids == [5, 6] and len(out.new_logprobs) == 2
    assert out.finish_reason == "stop" and out.stop_reason == (6 if kind == "stop_id" else None)
    assert s.get_request("a") is None and not s.has_unfinished_requests()
    assert s.kv.pool.num_free_blocks == 16  # freed at once
    assert s.schedule().finished_req_ids == {"a"}  # the worker drops its state with the next step
    s.check_invariants()


def test_max_tokens_reached_mid_list():
    s = make_scheduler()
    so = _prefill(s, make_request("a", [1, 2, 3], max_tokens=2))
    (out,) = _take(s, so, [5, 6, 7])
    assert out.new_token_ids == [5, 6] and out.finish_reason == "length"
    assert s.get_request("a") is None


def test_max_model_len_reached_mid_list():
    s = make_scheduler(max_model_len=5)
    so = _prefill(s, make_request("a", [1, 2, 3], max_tokens=None))
    (out,) = _take(s, so, [5, 6, 7])
    assert out.new_token_ids == [5, 6] and out.finish_reason == "length"


def test_min_tokens_holds_eos_back_token_by_token():
    s = make_scheduler()
    so = _prefill(s, make_request("a", [1, 2, 3], max_tokens=10, eos_token_ids={5}, stop_token_ids={9},
                                  min_tokens=3))
    (out,) = _take(s, so, [5, 9, 5, 5, 7])  # EOS and the stop id held back until 3 tokens are out
    assert out.new_token_ids == [5, 9, 5] and out.finish_reason == "stop" and out.stop_reason is None


def test_malformed_lists_are_refused():
    s = make_scheduler()
    so = _prefill(s, make_request("a", [1, 2, 3]))
    with pytest.raises(ValueError, match="sampled_token_ids"):
        s.update_from_output(so, ModelRunnerOutput(so.step_id, {"a": []}))
    s = make_scheduler()
    so = _prefill(s, make_request("a", [1, 2, 3]))
    with pytest.raises(ValueError, match="logprobs"):
        s.update_from_output(so, ModelRunnerOutput(so.step_id, {"a": [5, 6]}, {"a": _lp([5])}))


def test_overlapped_loop_keeps_only_the_first_token_while_a_later_step_is_in_flight():
    s = make_scheduler(block_size=4)
    so1 = _prefill(s, make_request("a", [1, 2, 3], max_tokens=10))
    req = s.get_request("a")
    assert req.num_output_placeholders == 1
    so2 = s.schedule()  # step 2 computes the position of step 1's token, still on the device
    assert so2.num_scheduled_tokens == {"a": 1} and req.num_output_placeholders == 2
    # Step 2 was scheduled after one token: it sampled the successor of 5, so 6 and 7 are dropped.
    (out,) = _take(s, so1, [5, 6, 7])
    assert out.new_token_ids == [5] and len(out.new_logprobs) == 1
    assert req.output_token_ids == [5] and req.num_output_placeholders == 1
    s.check_invariants()
    so3 = s.schedule()
    assert so3.num_scheduled_tokens == {"a": 1} and req.num_output_placeholders == 2
    # Step 2's output: step 3 (in flight) again keeps only the first.
    (out,) = _take(s, so2, [8, 9])
    assert out.new_token_ids == [8] and req.num_output_placeholders == 1
    # Nothing later in flight for step 3's output: all of it is taken, and the next step computes it.
    (out,) = _take(s, so3, [10, 11, 12])
    assert out.new_token_ids == [10, 11, 12] and req.num_output_placeholders == 0
    assert req.all_token_ids == [1, 2, 3, 5, 8, 10, 11, 12] and req.num_computed_tokens == 5
    so4 = s.schedule()
    assert so4.num_scheduled_tokens == {"a": 3} and req.num_output_placeholders == 1
    s.check_invariants()


def test_overlapped_loop_length_limit_counts_each_placeholder_as_one_token():
    s = make_scheduler()
    so1 = _prefill(s, make_request("a", [1, 2, 3], max_tokens=3))
    so2 = s.schedule()
    (out,) = _take(s, so1, [5, 6])  # trimmed to [5]: step 2 is in flight
    assert out.new_token_ids == [5]
    so3 = s.schedule()
    assert so3.num_scheduled_tokens == {"a": 1}  # 1 out + 1 in flight < 3
    (out,) = _take(s, so2, [7, 8])
    assert out.new_token_ids == [7]
    assert s.schedule().num_scheduled_tokens == {}  # 2 out + 1 in flight reach max_tokens: not scheduled again
    (out,) = _take(s, so3, [9, 10, 11])  # the last placeholder: max_tokens ends it at the first
    assert out.new_token_ids == [9] and out.finish_reason == "length"
    assert not s.has_unfinished_requests()
    s.check_invariants()


def test_preempted_with_tokens_in_flight_takes_them_all():
    s = make_scheduler(num_blocks=2, block_size=4, max_num_seqs=2)
    s.add_request(make_request("a", [1, 2, 3, 4], max_tokens=20))
    s.add_request(make_request("b", [5, 6, 7, 8], max_tokens=20))
    so1 = s.schedule()
    assert so1.num_scheduled_tokens == {"a": 4, "b": 4}
    so2 = s.schedule()  # each computes its 5th position: the pool has no 3rd block, so b is preempted
    assert so2.preempted_req_ids == {"b"}
    b = s.get_request("b")
    assert b.status is RequestStatus.PREEMPTED and b.num_output_placeholders == 1
    outs = s.update_from_output(so1, ModelRunnerOutput(so1.step_id, {"a": [17, 18], "b": [9, 10]}))
    assert {o.request_id: o.new_token_ids for o in outs} == {"a": [17], "b": [9, 10]}
    assert b.output_token_ids == [9, 10] and b.num_output_placeholders == 0
    s.check_invariants()


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
@pytest.mark.parametrize("seed", range(12))
def test_random_multi_token_simulation(seed, overlap):
    """The fake worker emits 1 to 4 tokens per sampling row (the toy model's own next tokens): every request
    still produces exactly the unbatched oracle's tokens and finish reason, the KV checks hold, no block leaks."""
    rng = random.Random(seed)
    vocab = 50
    block_size = rng.choice([1, 2, 4])
    num_blocks = rng.randint(6, 24)
    max_model_len = rng.randint(12, 48)
    s = make_scheduler(num_blocks=num_blocks, block_size=block_size, max_num_seqs=rng.randint(1, 5),
                       max_num_batched_tokens=rng.randint(4, 32), max_model_len=max_model_len,
                       prefix_caching=rng.random() < 0.7)
    sim = Sim(s, overlap=overlap, extra_tokens=lambda rid: rng.choice([0, 0, 1, 3]))
    added = {}
    for i in range(rng.randint(4, 12)):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 10))]
        kw = dict(max_tokens=rng.choice([None, 1, 3, 8, 15]), eos_token_ids=set(rng.sample(range(vocab), 2)),
                  stop_token_ids=set(rng.sample(range(vocab), rng.randint(0, 2))), min_tokens=rng.choice([0, 2]))
        req = make_request(f"r{i}", prompt, **kw)
        if req.num_tokens <= min(max_model_len, num_blocks * block_size):
            s.add_request(req)
            added[req.request_id] = req
        for _ in range(rng.randint(0, 3)):
            sim.step()
    sim.run(max_steps=3000)
    assert set(sim.finish) == set(added)
    for rid, req in added.items():
        want, reason = reference_generate(
            req.prompt_token_ids, max_tokens=req.max_tokens, eos=req.eos_token_ids, stop_ids=req.stop_token_ids,
            min_tokens=req.min_tokens, max_len=min(max_model_len, num_blocks * block_size + 1))
        assert sim.tokens[rid] == want, rid
        assert sim.finish[rid] == reason, rid
