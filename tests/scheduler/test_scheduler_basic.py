"""Scheduler: step structure, chunked prefill, max_num_seqs, prefix caching, add errors."""
import pytest

from moelink.scheduler import ModelRunnerOutput, RequestStatus, TokenLogprobs

from tests.helpers.scheduler_sim import Sim, make_request, make_scheduler, reference_generate, toy_model


def test_single_request_step_structure():
    s = make_scheduler(num_blocks=16, block_size=4, max_num_batched_tokens=64)
    s.add_request(make_request("a", [1, 2, 3, 4, 5, 6, 7], max_tokens=3))
    so = s.schedule()
    # First step: the whole prompt as a new request; 7 tokens need 2 blocks of 4.
    (nr,) = so.scheduled_new_reqs
    assert (nr.req_id, nr.prompt_token_ids, nr.output_token_ids, nr.num_computed_tokens) == ("a", [1, 2, 3, 4, 5, 6, 7], [], 0)
    assert len(nr.block_ids) == 2 and so.num_scheduled_tokens == {"a": 7} and so.total_num_scheduled_tokens == 7
    assert s.get_request("a").num_computed_tokens == 7  # advanced at schedule time
    outs = s.update_from_output(so, ModelRunnerOutput(so.step_id, {"a": [40]}))
    assert [(o.request_id, o.new_token_ids, o.finish_reason) for o in outs] == [("a", [40], None)]
    # Second step: a decode of the sampled token at position 7, the last slot of block 2.
    so = s.schedule()
    assert not so.scheduled_new_reqs
    (cr,) = so.scheduled_cached_reqs
    assert (cr.req_id, cr.new_block_ids, cr.num_computed_tokens) == ("a", [], 7) and so.num_scheduled_tokens == {"a": 1}
    s.update_from_output(so, ModelRunnerOutput(so.step_id, {"a": [41]}))
    so = s.schedule()  # position 8 needs a third block
    assert len(so.scheduled_cached_reqs[0].new_block_ids) == 1
    outs = s.update_from_output(so, ModelRunnerOutput(so.step_id, {"a": [42]}))
    assert outs[0].finish_reason == "length" and not s.has_unfinished_requests()
    assert s.has_finished_requests()
    so = s.schedule()
    assert so.is_empty and so.finished_req_ids == {"a"} and not s.has_finished_requests()
    assert s.kv.pool.num_free_blocks == 16


def test_chunked_prefill_splits_prompt_within_budget():
    s = make_scheduler(num_blocks=64, block_size=16, max_num_batched_tokens=32)
    sim = Sim(s)
    prompt = [i % 50 for i in range(100)]
    s.add_request(make_request("long", prompt, max_tokens=2))
    chunks = []
    for _ in range(4):
        so = sim.step()
        chunks.append(so.num_scheduled_tokens["long"])
        assert so.total_num_scheduled_tokens <= 32
    assert chunks == [32, 32, 32, 4]
    assert sim.tokens["long"] == [toy_model(prompt)]  # sampled only after the last chunk
    # Blocks arrive as the chunks need them: 2 at first, then 2 more per chunk, then 1.
    assert len(sim.steps[0].scheduled_new_reqs[0].block_ids) == 2
    assert [len(c.new_block_ids) for so in sim.steps[1:4] for c in so.scheduled_cached_reqs] == [2, 2, 1]
    sim.run()
    assert sim.tokens["long"] == reference_generate(prompt, max_tokens=2)[0]


def test_budget_goes_to_running_first_then_waiting_chunks():
    s = make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=10)
    sim = Sim(s)
    s.add_request(make_request("a", [1] * 8, max_tokens=5))
    s.add_request(make_request("b", [2] * 30, max_tokens=5))
    assert sim.step().num_scheduled_tokens == {"a": 8, "b": 2}
    assert sim.step().num_scheduled_tokens == {"a": 1, "b": 9}
    sim.run()
    for rid, p in (("a", [1] * 8), ("b", [2] * 30)):
        assert sim.tokens[rid] == reference_generate(p, max_tokens=5)[0]


def test_max_num_seqs_respected():
    s = make_scheduler(num_blocks=64, max_num_seqs=2, max_num_batched_tokens=100)
    sim = Sim(s)
    for i in range(5):
        s.add_request(make_request(f"r{i}", [i + 1, 2, 3], max_tokens=4))
    while s.has_unfinished_requests():
        so = sim.step()
        assert len(so.num_scheduled_tokens) <= 2 and len(s.running) <= 2
    sim.run()
    assert len(sim.finish) == 5
    # FCFS: r0 and r1 run first; r2 only starts once one of them finished.
    first_steps = {rid for so in sim.steps[:4] for rid in so.num_scheduled_tokens}
    assert first_steps == {"r0", "r1"}


def test_prefix_cache_hit_of_shared_64_token_prefix():
    s = make_scheduler(num_blocks=64, block_size=16, max_num_batched_tokens=256)
    sim = Sim(s)
    shared = [(7 * i) % 50 for i in range(64)]
    s.add_request(make_request("a", shared + [1, 2, 3], max_tokens=4))
    sim.step()  # a's prompt is computed; its 4 full blocks are cached after the step
    assert s.stats().prefix_cache_hits == 0 and s.stats().prefix_cache_queries == 67
    s.add_request(make_request("b", shared + [4, 5, 6, 7, 8], max_tokens=4))
    so = sim.step()
    (nr,) = so.scheduled_new_reqs
    assert nr.num_computed_tokens == 64 and so.num_scheduled_tokens["b"] == 5
    assert nr.block_ids[:4] == s.kv.get_block_ids("a")[:4]  # shared physical blocks
    assert s.kv.pool.ref_count(nr.block_ids[0]) == 2
    st = s.stats()
    assert (st.prefix_cache_queries, st.prefix_cache_hits) == (67 + 69, 64)
    sim.run()
    assert sim.cached == {"a": 0, "b": 64}
    assert sim.tokens["b"] == reference_generate(shared + [4, 5, 6, 7, 8], max_tokens=4)[0]


def test_a_cache_salt_keeps_kv_apart():
    """Requests whose KV depends on more than their tokens (an adapter, images) carry a cache salt: the same tokens
    under another salt share no block, under the same salt they hit, and the router's estimate says the same."""
    s = make_scheduler(num_blocks=64, block_size=16, max_num_batched_tokens=256)
    sim = Sim(s)
    shared = [(5 * i) % 50 for i in range(48)]
    s.add_request(make_request("a", shared + [1], max_tokens=2, cache_salt=b"lora:one"))
    sim.run()
    assert s.num_cached_prefix_tokens(shared + [2], b"lora:one") == 48
    assert s.num_cached_prefix_tokens(shared + [2], b"lora:two") == 0
    assert s.num_cached_prefix_tokens(shared + [2]) == 0
    for rid, salt, hit in (("b", b"lora:two", 0), ("c", b"", 0), ("d", b"lora:one", 48)):
        s.add_request(make_request(rid, shared + [2], max_tokens=1, cache_salt=salt))
        so = sim.step()
        assert so.scheduled_new_reqs[0].num_computed_tokens == hit, rid
        sim.run()
    with pytest.raises(ValueError, match="cache_salt"):
        make_request("e", [1], cache_salt="text")


_LORA: dict[str, object] = {}  # request id -> its adapter, as the LoRA tests added it


def _add(s, rid, prompt, max_tokens, lora=None, lora_id=0):
    _LORA[rid] = lora
    s.add_request(make_request(rid, prompt, max_tokens=max_tokens, lora_id=lora_id, lora=lora))


def test_no_more_adapters_run_at_once_than_lora_slots():
    """max_loras: a waiting request whose adapter would be one more than the slots waits until the last request of a
    running adapter leaves (the requests behind it that need no slot go on: test_a_request_waiting_for_a_lora_slot_
    blocks_no_other); the base model's requests count no slot; the adapter rides to the worker on
    NewRequestData.lora."""
    s = make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=256, max_loras=1)
    sim = Sim(s)
    _add(s, "a1", [1, 2, 3], 2, "A", 1)
    _add(s, "base", [4, 5], 2)
    _add(s, "a2", [6, 7], 4, "A", 1)
    _add(s, "b", [8, 9], 1, "B", 2)
    _add(s, "late", [3], 1)
    so = sim.step()
    assert [n.req_id for n in so.scheduled_new_reqs] == ["a1", "base", "a2", "late"]
    assert [n.lora for n in so.scheduled_new_reqs] == ["A", None, "A", None]
    while "b" not in {n.req_id for n in so.scheduled_new_reqs}:
        assert {_LORA[r] for r in so.num_scheduled_tokens} <= {None, "A"}
        so = sim.step()
    # a2 (adapter 1, four tokens) had finished before b (adapter 2) started: one adapter at a time.
    assert s.get_request("a2") is None and sim.tokens["a2"] and len(sim.tokens["a2"]) == 4
    sim.run()
    with pytest.raises(ValueError, match="lora_id"):
        make_request("bad", [1], lora_id=1)


def test_a_request_waiting_for_a_lora_slot_blocks_no_other():
    """Issue 76 item 5: with --max-loras 1 held by a long adapter-A generation, one queued adapter-B request kept
    every later request (another user's base-model request) waiting the whole A generation (FCFS). Now the
    requests behind B that need no new slot run at once, in order: the base model's and A's (resident). B keeps its
    place among the adapters: when A's slot frees, B takes it before a later adapter-C request. And A cannot hold
    its slot forever: past max_num_seqs requests of A overtaking B, A's new requests wait behind B (A drains)."""
    s = make_scheduler(num_blocks=256, block_size=4, max_num_seqs=4, max_num_batched_tokens=256, max_loras=1)
    sim = Sim(s)
    _add(s, "a-long", [1, 2, 3], 30, "A", 1)
    sim.step()
    _add(s, "b", [8, 9], 2, "B", 2)
    _add(s, "base", [4, 5], 2)
    _add(s, "a2", [6, 7], 2, "A", 1)
    _add(s, "c", [5, 6], 2, "C", 3)
    so = sim.step()
    assert [n.req_id for n in so.scheduled_new_reqs] == ["base", "a2"]  # not behind b: no new slot needed
    assert [r.request_id for r in s.waiting] == ["b", "c"]  # b and c keep their order
    started = {}
    for i in range(200):
        if "c" in started:
            break
        so = sim.step()
        for n in so.scheduled_new_reqs:
            started[n.req_id] = i
        assert len({_LORA[r] for r in so.num_scheduled_tokens} - {None}) <= 1
    assert started["b"] < started["c"], started  # the slot went to b, the first adapter waiting for one
    assert sim.finish["a-long"][0] == "length"
    sim.run()

    # Overtaking bounded: A kept busy by a new request every step would hold the slot forever.
    s = make_scheduler(num_blocks=256, block_size=4, max_num_seqs=4, max_num_batched_tokens=256, max_loras=1)
    sim = Sim(s)
    _add(s, "a0", [1, 2], 3, "A", 1)
    sim.step()
    _add(s, "b", [8, 9], 1, "B", 2)
    for i in range(40):
        _add(s, f"a{i + 1}", [3, 4], 3, "A", 1)
        so = sim.step()
        if "b" in {n.req_id for n in so.scheduled_new_reqs}:
            break
    else:
        raise AssertionError("b never got the slot: adapter A held it with a new request every step")
    overtook = sum(1 for st in sim.steps for n in st.scheduled_new_reqs if n.req_id != "a0" and n.lora == "A"
                   and st.step_id < so.step_id)
    assert overtook <= s.scheduler_config.max_num_seqs, overtook
    sim.run()


def test_the_lora_slot_scan_is_bounded_and_keeps_the_queue():
    """A wall of requests waiting for a LoRA slot is looked past at most MAX_LORA_SKIPS a step, and put back in
    order."""
    from moelink.scheduler import scheduler as sched_mod

    s = make_scheduler(num_blocks=256, block_size=4, max_num_seqs=4, max_num_batched_tokens=256, max_loras=1)
    sim = Sim(s)
    _add(s, "a", [1, 2], 5, "A", 1)
    sim.step()
    ids = [f"b{i}" for i in range(sched_mod.MAX_LORA_SKIPS + 5)]
    for rid in ids:
        _add(s, rid, [3], 1, "B", 2)
    _add(s, "base", [4], 1)
    so = sim.step()
    assert not so.scheduled_new_reqs and [r.request_id for r in s.waiting] == ids + ["base"]


def test_full_prompt_hit_still_computes_last_token():
    s = make_scheduler(num_blocks=64, block_size=16, max_num_batched_tokens=256)
    sim = Sim(s)
    prompt = list(range(48))  # exactly 3 blocks
    s.add_request(make_request("a", prompt, max_tokens=1))
    sim.run()
    s.add_request(make_request("b", prompt, max_tokens=1))
    so = sim.step()
    # At most 47 tokens may hit and hits are whole blocks: 32 hit, 16 computed.
    assert so.scheduled_new_reqs[0].num_computed_tokens == 32 and so.num_scheduled_tokens == {"b": 16}
    assert sim.tokens["b"] == sim.tokens["a"]


def test_generated_tokens_are_cached_too():
    s = make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=256)
    sim = Sim(s)
    prompt = [3, 1, 4, 1, 5, 9]
    s.add_request(make_request("a", prompt, max_tokens=10))
    sim.run()
    # A follow-up turn = prompt + a's answer + more: its KV for the answer is reused.
    # a's KV covers 15 of its 16 tokens (the last sampled one is never computed): 3 full blocks.
    follow = prompt + sim.tokens["a"] + [7, 7]
    s.add_request(make_request("b", follow, max_tokens=1))
    so = sim.step()
    assert so.scheduled_new_reqs[0].num_computed_tokens == 12
    sim.run()


def test_prefix_caching_disabled():
    s = make_scheduler(num_blocks=64, block_size=4, prefix_caching=False)
    sim = Sim(s)
    s.add_request(make_request("a", list(range(12)), max_tokens=2))
    sim.run()
    s.add_request(make_request("b", list(range(12)), max_tokens=2))
    assert sim.step().scheduled_new_reqs[0].num_computed_tokens == 0
    sim.run()
    assert s.stats().prefix_cache_hits == 0 and s.kv.pool.num_cached_blocks == 0


def test_add_request_errors():
    s = make_scheduler(num_blocks=4, block_size=4, max_model_len=20)
    s.add_request(make_request("a", [1, 2]))
    with pytest.raises(ValueError, match=r"request_id='a' is invalid: an unfinished request already uses it"):
        s.add_request(make_request("a", [1, 2]))
    with pytest.raises(ValueError, match=r"21 tokens, more than SchedulerConfig\.max_model_len=20"):
        s.add_request(make_request("b", [1] * 21))
    with pytest.raises(ValueError, match=r"needs 5 KV blocks, more than the whole pool \(CacheConfig\.num_kv_blocks=4\)"):
        s.add_request(make_request("c", [1] * 17))
    s.add_request(make_request("d", [1] * 16))  # exactly the whole pool is fine
    assert s.get_num_unfinished_requests() == 2
    stats = s.stats()
    assert (stats.num_waiting, stats.num_running, stats.num_total_blocks, stats.num_free_blocks) == (2, 0, 4, 4)


def test_step_id_mismatch_and_logprobs():
    s = make_scheduler()
    s.add_request(make_request("a", [1, 2]))
    so = s.schedule()
    with pytest.raises(ValueError, match="ModelRunnerOutput.step_id"):
        s.update_from_output(so, ModelRunnerOutput(so.step_id + 1, {"a": [3]}))
    lp = TokenLogprobs(3, -0.1, 1, [(3, -0.1), (4, -2.5)])
    (out,) = s.update_from_output(so, ModelRunnerOutput(so.step_id, {"a": [3]}, {"a": [lp]}))
    assert out.new_logprobs == [lp] and out.new_token_ids == [3]
    assert s.get_request("a").status is RequestStatus.RUNNING


def test_token_sampled_mid_prompt_is_ignored():
    s = make_scheduler(block_size=4, max_num_batched_tokens=4)
    s.add_request(make_request("a", list(range(10))))
    so = s.schedule()
    assert so.num_scheduled_tokens == {"a": 4}
    assert s.update_from_output(so, ModelRunnerOutput(so.step_id, {"a": [99]})) == []
    assert s.get_request("a").output_token_ids == []


def test_waiting_queue_is_fcfs_even_when_a_later_request_would_fit():
    s = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=64)
    sim = Sim(s)
    s.add_request(make_request("a", [1] * 12, max_tokens=4))  # 3 blocks
    sim.step()
    s.add_request(make_request("big", [2] * 16, max_tokens=1))  # needs 4+ blocks: only 3 free
    s.add_request(make_request("small", [3] * 2, max_tokens=1))  # would fit in 1
    so = sim.step()
    assert list(so.num_scheduled_tokens) == ["a"] and [r.request_id for r in s.waiting] == ["big", "small"]
    sim.run()
    first = {rid: next(i for i, so in enumerate(sim.steps) if rid in so.num_scheduled_tokens) for rid in sim.finish}
    assert first["big"] <= first["small"]


def test_block_hash_lookahead_makes_a_hit_match_the_next_token_too():
    """CacheConfig.block_hash_lookahead = 1 (a drafter's cache layer written from the next token, MTP or
    EAGLE-3): a block hits only when the token after it matches too, since its last slot's draft state was
    computed from that token."""
    from moelink.scheduler import CacheConfig, Scheduler, SchedulerConfig

    shared = [(7 * i) % 50 for i in range(64)]  # 4 blocks of 16
    # (lookahead, the second prompt's tail, its hit): with the lookahead, block 3 hits only if token 64 matches.
    for lookahead, tail, hit in ((0, [4, 5, 6, 7, 8], 64), (1, [4, 5, 6, 7, 8], 48), (1, [1, 9, 9, 9, 9], 64)):
        s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=512),
                      CacheConfig(block_size=16, num_kv_blocks=64, block_hash_lookahead=lookahead))
        sim = Sim(s)
        s.add_request(make_request("a", shared + [1, 2, 3], max_tokens=4))
        sim.step()
        s.add_request(make_request("b", shared + tail, max_tokens=4))
        so = sim.step()
        (nr,) = so.scheduled_new_reqs
        assert nr.num_computed_tokens == hit and so.num_scheduled_tokens["b"] == 69 - hit
        assert nr.block_ids[: hit // 16] == s.kv.get_block_ids("a")[: hit // 16]
        sim.run()
        assert sim.tokens["b"] == reference_generate(shared + tail, max_tokens=4)[0]
    with pytest.raises(ValueError, match="block_hash_lookahead=2 is invalid"):
        CacheConfig(block_hash_lookahead=2)
