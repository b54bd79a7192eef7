"""Stop conditions and aborts."""
import pytest

from moelink.scheduler import ModelRunnerOutput, RequestStatus

from tests.helpers.scheduler_sim import Sim, make_request, make_scheduler


def _drive(s, req, tokens):
    """Feed `tokens` as the sampled tokens of a lone request; return its outputs."""
    s.add_request(req)
    outs = []
    for t in tokens:
        so = s.schedule()
        outs += s.update_from_output(so, ModelRunnerOutput(so.step_id, {req.request_id: [t]}))
        if outs and outs[-1].finish_reason:
            break
    return outs


def _summary(outs):
    return [t for o in outs for t in o.new_token_ids], outs[-1].finish_reason, outs[-1].stop_reason


def test_eos_stops():
    s = make_scheduler()
    outs = _drive(s, make_request("a", [1, 2], max_tokens=10, eos_token_ids={0, 99}), [5, 6, 99, 7])
    assert _summary(outs) == ([5, 6, 99], "stop", None)
    assert all(o.finish_reason is None for o in outs[:-1])


def test_ignore_eos():
    s = make_scheduler()
    outs = _drive(s, make_request("a", [1, 2], max_tokens=3, eos_token_ids={0}, ignore_eos=True), [0, 0, 0, 0])
    assert _summary(outs) == ([0, 0, 0], "length", None)


def test_stop_token_sets_stop_reason():
    s = make_scheduler()
    outs = _drive(s, make_request("a", [1, 2], max_tokens=10, stop_token_ids={42}), [5, 42, 6])
    assert _summary(outs) == ([5, 42], "stop", 42)


def test_eos_checked_before_stop_token_and_max_tokens():
    s = make_scheduler()
    outs = _drive(s, make_request("a", [1], max_tokens=2, eos_token_ids={7}, stop_token_ids={7}), [3, 7])
    assert _summary(outs) == ([3, 7], "stop", None)


def test_max_tokens():
    s = make_scheduler()
    outs = _drive(s, make_request("a", [1, 2], max_tokens=3), [5, 6, 7, 8])
    assert _summary(outs) == ([5, 6, 7], "length", None)


def test_max_model_len():
    s = make_scheduler(max_model_len=12)
    outs = _drive(s, make_request("a", list(range(10)), max_tokens=None), [5, 6, 7, 8])
    assert _summary(outs) == ([5, 6], "length", None)  # 10 + 2 = max_model_len


def test_prompt_of_exactly_max_model_len_gets_one_token():
    s = make_scheduler(max_model_len=8)
    outs = _drive(s, make_request("a", list(range(8)), max_tokens=None), [5, 6])
    assert _summary(outs) == ([5], "length", None)


def test_min_tokens_suppresses_early_stops():
    s = make_scheduler()
    req = make_request("a", [1], max_tokens=10, eos_token_ids={0}, stop_token_ids={9}, min_tokens=3)
    outs = _drive(s, req, [0, 9, 0, 4])
    assert _summary(outs) == ([0, 9, 0], "stop", None)  # the 3rd token may stop


def test_sequence_longer_than_the_pool_ends_with_length():
    # 4 blocks of 4 = 16 tokens of KV; max_model_len allows more. Alone, the
    # request can compute 16 tokens and sample a 17th, then it must end
    # rather than preempt itself forever.
    s = make_scheduler(num_blocks=4, block_size=4, max_model_len=100)
    sim = Sim(s)
    s.add_request(make_request("a", list(range(10)), max_tokens=None))
    sim.run(max_steps=50)
    assert len(sim.tokens["a"]) == 7 and sim.finish["a"] == ("length", None)


def test_abort_waiting_and_running_frees_everything():
    s = make_scheduler(num_blocks=16, block_size=4, max_num_seqs=1)
    sim = Sim(s)
    for rid in "abc":
        s.add_request(make_request(rid, [1, 2, 3, 4, 5], max_tokens=20))
    sim.step()
    assert [r.request_id for r in s.running] == ["a"] and len(s.waiting) == 2
    s.finish_requests(["b", "unknown"], RequestStatus.FINISHED_ABORTED)  # waiting; unknown ignored
    s.finish_requests("a", RequestStatus.FINISHED_ABORTED)  # running
    assert s.kv.pool.num_free_blocks == 16 and s.get_num_unfinished_requests() == 1
    so = sim.step()
    assert so.finished_req_ids == {"a", "b"} and list(so.num_scheduled_tokens) == ["c"]
    assert "a" not in sim.worker.reqs
    s.finish_requests("c", RequestStatus.FINISHED_STOPPED)  # e.g. a stop string, found by the engine
    assert not s.has_unfinished_requests()
    sim.step()
    assert s.kv.pool.num_free_blocks == 16 and not sim.worker.reqs
    assert "a" not in sim.finish  # aborts produce no EngineCoreOutput: the engine decided them
    with pytest.raises(ValueError, match="must be a FINISHED_"):
        s.finish_requests("c", RequestStatus.RUNNING)


def test_abort_while_scheduled_ignores_its_token():
    s = make_scheduler(num_blocks=16, block_size=4)
    s.add_request(make_request("a", [1, 2, 3], max_tokens=5))
    s.add_request(make_request("b", [4, 5, 6], max_tokens=5))
    so = s.schedule()
    s.finish_requests("a", RequestStatus.FINISHED_ABORTED)  # the step is in flight
    outs = s.update_from_output(so, ModelRunnerOutput(so.step_id, {"a": [9], "b": [8]}))
    assert [o.request_id for o in outs] == ["b"]
    # Re-using the id right away is allowed and starts a fresh request.
    s.add_request(make_request("a", [7, 7], max_tokens=1))
    so = s.schedule()
    assert "a" in so.finished_req_ids and [r.req_id for r in so.scheduled_new_reqs] == ["a"]
    s.check_invariants()


def test_abort_of_a_preempted_request():
    s = make_scheduler(num_blocks=3, block_size=2, max_num_batched_tokens=64)
    sim = Sim(s)
    s.add_request(make_request("a", [1, 2, 3], max_tokens=3))
    s.add_request(make_request("b", [4, 5], max_tokens=3))
    so = sim.step()  # a: 2 blocks, b: 1 block
    so = sim.step()  # b's next token needs a 4th block: b (the latest arrival) is preempted
    assert so.preempted_req_ids == {"b"} and s.get_request("b").status is RequestStatus.PREEMPTED
    s.finish_requests("b", RequestStatus.FINISHED_ABORTED)
    sim.run()
    assert sim.finish["a"] == ("length", None) and "b" not in sim.finish


def test_abort_and_readd_of_the_same_id_while_in_flight():
    s = make_scheduler(num_blocks=16, block_size=4)
    s.add_request(make_request("a", [1, 2, 3], max_tokens=5))
    so = s.schedule()
    s.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    s.add_request(make_request("a", [7, 7], max_tokens=5))  # a new request, not yet scheduled
    assert s.update_from_output(so, ModelRunnerOutput(so.step_id, {"a": [9]})) == []
    assert s.get_request("a").output_token_ids == [] and s.get_request("a").status is RequestStatus.WAITING
    s.check_invariants()
