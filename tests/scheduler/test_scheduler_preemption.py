"""Preemption by recompute when the KV pool runs out."""
from moelink.scheduler import RequestStatus

from tests.helpers.scheduler_sim import Sim, make_request, make_scheduler, reference_generate


def _prompts():
    return {f"r{i}": [(i * 11 + j * 3) % 50 for j in range(6 + i)] for i in range(4)}


def test_preempted_requests_resume_and_match_an_unconstrained_run():
    prompts = _prompts()
    results = {}
    for num_blocks in (64, 10):  # 10 blocks of 4: four requests of ~26 tokens cannot all fit
        s = make_scheduler(num_blocks=num_blocks, block_size=4, max_num_batched_tokens=32)
        sim = Sim(s)
        for rid, p in prompts.items():
            s.add_request(make_request(rid, p, max_tokens=20))
        sim.run()
        results[num_blocks] = (dict(sim.tokens), s.stats().num_preemptions_total, sim)
    assert results[64][1] == 0 and results[10][1] > 0
    assert results[10][0] == results[64][0]  # recompute changes nothing in the outputs
    for rid, p in prompts.items():
        assert results[10][0][rid] == reference_generate(p, max_tokens=20)[0]
    # A resumed request is re-sent whole: prompt plus the outputs it had so far.
    sim = results[10][2]
    preempted_at = next(i for i, so in enumerate(sim.steps) if so.preempted_req_ids)
    victim = next(iter(sim.steps[preempted_at].preempted_req_ids))
    resumed = next(nr for so in sim.steps[preempted_at + 1:] for nr in so.scheduled_new_reqs if nr.req_id == victim)
    assert resumed.prompt_token_ids == prompts[victim] and len(resumed.output_token_ids) > 0
    assert resumed.output_token_ids == sim.tokens[victim][:len(resumed.output_token_ids)]


def test_victim_is_the_latest_arrival_and_goes_to_the_front():
    s = make_scheduler(num_blocks=6, block_size=2, max_num_batched_tokens=64)
    sim = Sim(s)
    s.add_request(make_request("old", [1, 2, 3, 4], max_tokens=10))
    s.add_request(make_request("mid", [4, 5, 6, 7], max_tokens=10))
    s.add_request(make_request("new", [7, 8], max_tokens=10))
    sim.step()  # old: 2 blocks, mid: 2, new: 1 -> one free
    s.add_request(make_request("later", [9, 9], max_tokens=1))
    so = sim.step()  # old and mid need a 3rd block each: only one is free
    assert so.preempted_req_ids == {"new"}
    assert [r.request_id for r in s.waiting] == ["new", "later"]
    assert not so.scheduled_new_reqs  # no admissions in a step that preempted
    req = s.get_request("new")
    assert (req.status, req.num_computed_tokens, req.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    assert req.output_token_ids  # keeps its output
    sim.run()
    assert set(sim.finish) == {"old", "mid", "new", "later"}


def test_preemption_reuses_its_own_cached_blocks():
    # The victim's full blocks stay cached after it is preempted, so resuming
    # it recomputes only what was evicted meanwhile.
    s = make_scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=64)
    sim = Sim(s)
    s.add_request(make_request("a", list(range(12)), max_tokens=12))
    s.add_request(make_request("b", list(range(20, 32)), max_tokens=12))
    sim.run()
    assert s.stats().num_preemptions_total >= 1 and s.stats().prefix_cache_hits > 0
    assert sim.tokens["b"] == reference_generate(list(range(20, 32)), max_tokens=12)[0]


def test_running_self_preemption_when_alone_at_the_end():
    # Two requests whose growth exceeds the pool: the later one preempts itself
    # (it is the lowest priority) and still completes after the first one.
    s = make_scheduler(num_blocks=5, block_size=2, max_num_batched_tokens=64)
    sim = Sim(s)
    s.add_request(make_request("a", [1, 2], max_tokens=6))
    s.add_request(make_request("b", [3, 4], max_tokens=6))
    sim.run()
    assert s.stats().num_preemptions_total >= 1
    assert sim.finish == {"a": ("length", None), "b": ("length", None)}
    assert s.stats().num_free_blocks == s.stats().num_total_blocks
