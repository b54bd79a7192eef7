"""Scheduler.requeue: a request taken over from a lost rank's scheduler resumes from its tokens (elastic EP)."""
import pytest

from moelink.scheduler import RequestStatus

from tests.helpers.scheduler_sim import Sim, make_request, make_scheduler, reference_generate


def test_requeued_request_recomputes_and_finishes_as_if_undisturbed():
    prompts = {f"r{i}": [(i * 7 + j) % 50 for j in range(5 + i)] for i in range(3)}
    lost = make_scheduler(num_blocks=32, block_size=4)
    sim = Sim(lost)
    for rid, p in prompts.items():
        lost.add_request(make_request(rid, p, max_tokens=12))
    for _ in range(4):
        sim.step()  # every request has some outputs, none finished
    reqs = list(lost.requests.values())
    assert all(0 < r.num_output_tokens < 12 for r in reqs)
    survivor = make_scheduler(num_blocks=32, block_size=4)
    new_sim = Sim(survivor)
    for r in reqs:
        survivor.requeue(r)
    assert all(r.status is RequestStatus.PREEMPTED and r.num_computed_tokens == 0 for r in reqs)
    so = new_sim.step()
    # Re-sent whole: prompt plus the outputs so far, KV recomputed from nothing.
    for nr in so.scheduled_new_reqs:
        assert nr.prompt_token_ids == prompts[nr.req_id] and nr.output_token_ids and nr.num_computed_tokens == 0
    new_sim.run()
    by_id = {r.request_id: r for r in reqs}
    for rid, p in prompts.items():
        want = reference_generate(p, max_tokens=12)[0]
        assert by_id[rid].output_token_ids == want
        assert sim.tokens[rid] + new_sim.tokens[rid] == want  # streamed before, then after: nothing twice
    st = survivor.stats()
    assert st.num_running == st.num_waiting == 0 and st.num_free_blocks == st.num_total_blocks


def test_requeue_refuses_a_taken_id_and_a_finished_request():
    s = make_scheduler(num_blocks=8, block_size=4)
    s.add_request(make_request("a", [1, 2, 3], max_tokens=2))
    with pytest.raises(ValueError, match="'a' is invalid: an unfinished request already uses it"):
        s.requeue(make_request("a", [1, 2], max_tokens=2))
    done = make_request("b", [1, 2], max_tokens=2)
    done.status = RequestStatus.FINISHED_LENGTH
    with pytest.raises(ValueError, match="'b' is invalid: it is finished \\(FINISHED_LENGTH\\)"):
        s.requeue(done)
