"""Randomized simulation: tiny pools, shared prefixes, chunking, preemption, aborts.

The oracle is twofold: the fake worker (conftest) checks every KV read against
the request's own prefix, and every request that was not aborted must produce
exactly what an unbatched reference generation produces with the same stop
rules. The pool must be entirely free at the end.
"""
import random

import pytest

from moelink.scheduler import RequestStatus

from tests.helpers.scheduler_sim import Sim, make_request, make_scheduler, reference_generate


def _random_request(rng, rid, prefixes, vocab):
    base = rng.choice(prefixes)
    prompt = base[:rng.randint(0, len(base))] + [rng.randrange(vocab) for _ in range(rng.randint(1, 12))]
    kw = dict(
        max_tokens=rng.choice([None, 1, 2, 5, 10, 20]),
        eos_token_ids=set(rng.sample(range(vocab), rng.randint(0, 2))),
        stop_token_ids=set(rng.sample(range(vocab), rng.randint(0, 2))),
        min_tokens=rng.choice([0, 0, 1, 3]),
        ignore_eos=rng.random() < 0.2,
    )
    if kw["max_tokens"] is not None:
        kw["min_tokens"] = min(kw["min_tokens"], kw["max_tokens"])
    return make_request(rid, prompt, **kw)


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
@pytest.mark.parametrize("seed", range(40))
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_random_simulation(seed, overlap):
    """`overlap`: the engine's overlapped loop (each step's output taken after the next step is scheduled) must
    give every request the tokens and finish reason of the unbatched oracle too, and leak no block."""
    rng = random.Random(seed)
    vocab = 50
    block_size = rng.choice([1, 2, 3, 4, 8])
    num_blocks = rng.randint(4, 24)
    max_model_len = rng.randint(8, 64)
    s = make_scheduler(num_blocks=num_blocks, block_size=block_size, max_num_seqs=rng.randint(1, 6),
                       max_num_batched_tokens=rng.randint(1, 40), max_model_len=max_model_len,
                       prefix_caching=rng.random() < 0.8)
    pool_tokens = num_blocks * block_size
    sim = Sim(s, overlap=overlap)
    prefixes = [[rng.randrange(vocab) for _ in range(rng.randint(0, 24))] for _ in range(3)]
    added, aborted = {}, set()

    def abort_some(so=None):
        live = sorted(s.requests)
        if live and rng.random() < 0.08:
            rid = rng.choice(live)
            status = rng.choice([RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_STOPPED])
            s.finish_requests(rid, status)
            aborted.add(rid)

    for step in range(400):
        if step < 250 and rng.random() < 0.35:
            rid = f"r{len(added)}"
            req = _random_request(rng, rid, prefixes, vocab)
            if req.num_tokens > min(max_model_len, pool_tokens):
                with pytest.raises(ValueError):
                    s.add_request(req)
            else:
                s.add_request(req)
                added[rid] = req
        abort_some()
        sim.step(in_flight=abort_some)
        st = s.stats()
        assert 0.0 <= st.kv_usage <= 1.0 and st.num_running + st.num_waiting == s.get_num_unfinished_requests()
        if step >= 250 and not s.has_unfinished_requests():
            break
    sim.run(max_steps=5000)

    assert set(sim.finish) | aborted == set(added)
    for rid, req in added.items():
        want, reason = reference_generate(
            req.prompt_token_ids, max_tokens=req.max_tokens, eos=req.eos_token_ids, stop_ids=req.stop_token_ids,
            min_tokens=req.min_tokens, ignore_eos=req.ignore_eos, max_len=min(max_model_len, pool_tokens + 1))
        if rid in aborted:
            assert sim.tokens[rid] == want[:len(sim.tokens[rid])]
        else:
            assert (sim.tokens[rid], sim.finish[rid]) == (want, reason), rid
    st = s.stats()
    assert st.num_free_blocks == st.num_total_blocks and st.kv_usage == 0.0
    assert st.prefix_cache_hits <= st.prefix_cache_queries
    s.kv.pool.check_invariants()


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_random_simulation_exercises_the_interesting_paths(overlap):
    """The seeds above really hit preemptions, prefix hits and chunking."""
    rng = random.Random(1234)
    s = make_scheduler(num_blocks=12, block_size=4, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64)
    sim = Sim(s, overlap=overlap)
    shared = [rng.randrange(50) for _ in range(16)]
    for i in range(12):
        s.add_request(make_request(f"r{i}", shared + [i, i + 1, i + 2], max_tokens=12))
        sim.step()
    sim.run()
    st = s.stats()
    assert st.num_preemptions_total > 0 and st.prefix_cache_hits > 0
    assert any(so.num_scheduled_tokens[nr.req_id]  # a first chunk that did not reach the last token
               < len(nr.prompt_token_ids) + len(nr.output_token_ids) - nr.num_computed_tokens
               for so in sim.steps for nr in so.scheduled_new_reqs)
    for i in range(12):
        assert sim.tokens[f"r{i}"] == reference_generate(shared + [i, i + 1, i + 2], max_tokens=12)[0]
