"""The scheduler side of the KV connector seam (scheduler/kv_connector.py): loads instead of prefill, saves after
it, every transfer holding its blocks until reported, failures recomputed; nothing at all without a connector.

The fake worker (tests/helpers/scheduler_sim.py) runs the transfers on its fingerprint KV store, so a request
that loads another scheduler's saved KV is checked position by position like computed KV."""
import random

import pytest

from moelink.scheduler import ModelRunnerOutput, RequestStatus
from moelink.scheduler.outputs import KVTransfer

from tests.helpers.scheduler_sim import Sim, make_request, make_scheduler, reference_generate


class FakeConnector:
    """Loads what `store` holds for a request whose prompt it saved; saves the requests in `save` (all: True)."""

    def __init__(self, store=None, save=(), prompts=None):
        self.store = store if store is not None else {}
        self.save = save
        self.prompts = prompts if prompts is not None else {}  # request id -> the prompt its KV was saved for
        self.done: list[tuple[str, str, bool]] = []
        self.asked: list[str] = []

    def num_loadable_tokens(self, req):
        self.asked.append(req.request_id)
        saved = self.store.get(req.request_id)
        if saved is None or self.prompts.get(req.request_id) != req.prompt_token_ids[:len(saved)]:
            return 0
        return len(saved)

    def wants_save(self, req):
        if self.save is True or req.request_id in self.save:
            self.prompts[req.request_id] = list(req.prompt_token_ids)
            return True
        return False

    def transfer_done(self, t: KVTransfer, ok):
        self.done.append((t.req_id, "save" if t.token_ids else "load", ok))


def _scheduler(connector, **kw):
    from moelink.scheduler import CacheConfig, Scheduler, SchedulerConfig

    base = dict(num_blocks=16, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    base.update(kw)
    s = make_scheduler(**base)
    return Scheduler(s.scheduler_config, s.cache_config, kv_connector=connector)


def _report(s, so, done, sampled=None):
    return s.update_from_output(so, ModelRunnerOutput(so.step_id, sampled or {}, kv_transfers_done=done))


def test_no_connector_plans_nothing():
    s = make_scheduler()
    assert s.kv_transfers is None
    s.add_request(make_request("a", [1, 2, 3]))
    so = s.schedule()
    assert so.kv_transfers is None and not s.has_finished_requests()


def test_load_waits_holding_its_blocks_then_computes_only_the_last_prompt_token():
    store = {"a": list(range(10))}
    conn = FakeConnector(store, prompts={"a": list(range(10))})
    s = _scheduler(conn)
    s.add_request(make_request("a", list(range(10)), max_tokens=4))
    so = s.schedule()
    assert so.num_scheduled_tokens == {} and not so.scheduled_new_reqs
    (t,) = so.kv_transfers.loads
    assert (t.req_id, t.num_tokens, t.first_block, len(t.block_ids)) == ("a", 10, 0, 3)
    a = s.get_request("a")
    assert a.status is RequestStatus.WAITING_FOR_KV and s.stats().num_free_blocks == 13
    for b in t.block_ids:  # the request's reference and the transfer's
        assert s.kv.pool.ref_count(b) == 2
    s.check_invariants()
    _report(s, so, None)
    so = s.schedule()  # nothing reported yet: still waiting, the transfer awaited
    assert so.num_scheduled_tokens == {} and so.kv_transfers.num_awaited == 1 and not so.kv_transfers.loads
    assert s.has_finished_requests()  # the engine keeps stepping for the report
    _report(s, so, {t.transfer_id: True})
    assert conn.done == [("a", "load", True)] and a.num_computed_tokens == 9
    assert all(s.kv.pool.ref_count(b) == 1 for b in t.block_ids)
    s.check_invariants()
    so = s.schedule()
    (new,) = so.scheduled_new_reqs
    assert new.num_computed_tokens == 9 and new.block_ids == t.block_ids and so.num_scheduled_tokens == {"a": 1}
    assert so.kv_transfers is None and not s.has_finished_requests()
    (out,) = _report(s, so, None, {"a": [7]})
    assert out.new_token_ids == [7] and a.status is RequestStatus.RUNNING
    s.check_invariants()


def test_load_of_a_saved_prefix_computes_the_rest():
    conn = FakeConnector({"a": [1, 2, 3, 4, 5, 6, 7, 8]}, prompts={"a": [1, 2, 3, 4, 5, 6, 7, 8]})
    s = _scheduler(conn)
    s.add_request(make_request("a", list(range(1, 13))))  # 12 tokens, 8 of them saved
    so = s.schedule()
    (t,) = so.kv_transfers.loads
    assert t.num_tokens == 8 and len(t.block_ids) == 2
    _report(s, so, {t.transfer_id: True})
    so = s.schedule()
    assert so.scheduled_new_reqs[0].num_computed_tokens == 8 and so.num_scheduled_tokens == {"a": 4}
    s.check_invariants()


def test_load_skips_the_prefix_cache_hit():
    prompt = list(range(12))
    conn = FakeConnector({"b": prompt}, prompts={"b": prompt})
    s = _scheduler(conn)
    s.add_request(make_request("a", prompt[:8] + [99], max_tokens=1))  # computes and caches blocks 0 and 1
    so = s.schedule()
    _report(s, so, None, {"a": [5]})
    s.add_request(make_request("b", prompt, max_tokens=1))
    so = s.schedule()
    (t,) = so.kv_transfers.loads
    assert t.first_block == 2 and t.num_tokens == 12 and len(t.block_ids) == 3
    assert s.kv.pool.ref_count(t.block_ids[2]) == 2 and s.kv.pool.ref_count(t.block_ids[0]) == 1
    s.check_invariants()


def test_failed_load_is_recomputed():
    conn = FakeConnector({"a": list(range(8))}, prompts={"a": list(range(8))})
    s = _scheduler(conn)
    s.add_request(make_request("a", list(range(8)), max_tokens=2))
    so = s.schedule()
    (t,) = so.kv_transfers.loads
    _report(s, so, {t.transfer_id: False})
    a = s.get_request("a")
    assert a.status is RequestStatus.PREEMPTED and s.stats().num_free_blocks == 16
    assert conn.done == [("a", "load", False)]
    s.check_invariants()
    so = s.schedule()
    assert so.num_scheduled_tokens == {"a": 8} and so.scheduled_new_reqs[0].num_computed_tokens == 0
    assert conn.asked == ["a"]  # not asked again


def test_abort_while_loading_keeps_the_blocks_until_the_report():
    conn = FakeConnector({"a": list(range(8))}, prompts={"a": list(range(8))})
    s = _scheduler(conn)
    s.add_request(make_request("a", list(range(8))))
    so = s.schedule()
    (t,) = so.kv_transfers.loads
    s.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert not s.has_unfinished_requests() and s.stats().num_free_blocks == 14  # the transfer still writes them
    s.check_invariants()
    assert _report(s, s.schedule(), {t.transfer_id: True}) == []
    assert s.stats().num_free_blocks == 16 and conn.done == [("a", "load", True)]
    s.check_invariants()


def test_save_after_the_step_that_computes_the_last_prompt_token_and_hold_past_the_finish():
    conn = FakeConnector(save={"a"})
    s = _scheduler(conn, max_num_batched_tokens=4)
    prompt = [1, 2, 3, 4, 5, 6]
    s.add_request(make_request("a", prompt, max_tokens=1))
    so = s.schedule()  # 4 of 6 prompt tokens: no save yet
    assert so.kv_transfers is None
    _report(s, so, None)
    so = s.schedule()
    (t,) = so.kv_transfers.saves
    assert (t.num_tokens, t.token_ids, t.first_block, len(t.block_ids)) == (6, tuple(prompt), 0, 2)
    (out,) = _report(s, so, None, {"a": [9]})  # the prefill-only request ends with its first token
    assert out.finish_reason == "length" and not s.has_unfinished_requests()
    assert s.stats().num_free_blocks == 14 and s.has_finished_requests()  # the save still reads its blocks
    s.check_invariants()
    so = s.schedule()
    assert so.finished_req_ids == {"a"} and so.kv_transfers.num_awaited == 1
    _report(s, so, {t.transfer_id: True})
    assert s.stats().num_free_blocks == 16 and conn.done == [("a", "save", True)]
    assert not s.has_finished_requests() and s.schedule().kv_transfers is None
    s.check_invariants()


def test_loading_requests_hold_no_sequence_slot():
    """A load still on the network holds its blocks, not a slot (a KV source that accepts and stays silent must not
    fill max_num_seqs); loaded, it waits for a slot like anyone and is admitted first."""
    conn = FakeConnector({"a": [1, 2, 3, 4]}, prompts={"a": [1, 2, 3, 4]})
    s = _scheduler(conn, max_num_seqs=1)
    s.add_request(make_request("a", [1, 2, 3, 4]))
    s.add_request(make_request("b", [5, 6], max_tokens=1))
    so = s.schedule()
    assert so.num_scheduled_tokens == {"b": 2} and len(so.kv_transfers.loads) == 1  # b runs while a loads
    s.check_invariants()
    _report(s, so, {so.kv_transfers.loads[0].transfer_id: True}, {"b": [9]})  # a loaded; b ends (max_tokens 1)
    so = s.schedule()
    assert so.num_scheduled_tokens == {"a": 1}
    s.check_invariants()


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
@pytest.mark.parametrize("seed", range(12))
def test_random_prefill_then_decode_elsewhere(seed, overlap):
    """Scheduler A prefills and saves every prompt; scheduler B (another pool, other limits) loads them and
    decodes, with transfers reported late, some loads failing and some requests aborted. Every request B finishes
    produces the unbatched oracle's tokens, the loaded KV reads back as the request's own prefix, no block
    leaks."""
    rng = random.Random(seed)
    vocab, bs = 50, rng.choice([1, 2, 4])
    prefix = [rng.randrange(vocab) for _ in range(rng.randint(0, 12))]
    prompts = {f"r{i}": prefix[:rng.randint(0, len(prefix))] + [rng.randrange(vocab) for _ in range(rng.randint(1, 12))]
               for i in range(rng.randint(3, 10))}
    store: dict = {}
    conn_a = FakeConnector(store, save=True)
    a = _scheduler(conn_a, num_blocks=rng.randint(25, 40), block_size=bs, max_num_seqs=rng.randint(1, 4),
                   max_num_batched_tokens=rng.randint(4, 24))
    sim_a = Sim(a, overlap=overlap, kv_store=store, report_delay=lambda: rng.choice([0, 0, 1, 3]))
    for rid, p in prompts.items():
        a.add_request(make_request(rid, p, max_tokens=1))
    sim_a.run()
    assert set(store) == set(prompts) and all(ok for _, _, ok in conn_a.done)

    conn_b = FakeConnector(store, prompts=conn_a.prompts)
    max_len = 64
    num_blocks = rng.randint(25, 40)  # prompts have at most 24 tokens
    b = _scheduler(conn_b, num_blocks=num_blocks, block_size=bs, max_num_seqs=rng.randint(1, 4),
                   max_num_batched_tokens=rng.randint(4, 24), max_model_len=max_len)
    sim_b = Sim(b, overlap=overlap, kv_store=store, report_delay=lambda: rng.choice([0, 0, 1, 2]),
                load_fails=lambda: rng.random() < 0.2)
    reqs = {rid: make_request(rid, p, max_tokens=rng.choice([1, 4, 10]), eos_token_ids={rng.randrange(vocab)})
            for rid, p in prompts.items()}
    for req in reqs.values():
        b.add_request(req)
    aborted = set()

    def abort_some(so=None):
        live = sorted(b.requests)
        if live and rng.random() < 0.05:
            rid = rng.choice(live)
            b.finish_requests(rid, RequestStatus.FINISHED_ABORTED)
            aborted.add(rid)

    for _ in range(2000):
        if not b.has_unfinished_requests() and not b.kv_transfers.busy:
            break
        sim_b.step(in_flight=abort_some)
        st = b.stats()
        assert st.num_running + st.num_waiting == b.get_num_unfinished_requests()
    sim_b.run()
    assert any(kind == "load" and ok for _, kind, ok in conn_b.done), "nothing was loaded"
    assert set(sim_b.finish) | aborted == set(prompts)
    for rid, req in reqs.items():
        if rid in aborted:
            continue
        want, reason = reference_generate(req.prompt_token_ids, max_tokens=req.max_tokens, eos=req.eos_token_ids,
                                          max_len=min(max_len, num_blocks * bs + 1))
        assert sim_b.tokens[rid] == want and sim_b.finish[rid] == reason, rid


def _hybrid_scheduler(connector, **kw):
    """A scheduler of a model with per-sequence state (scheduler/hybrid_cache.py): state slots and checkpoints."""
    from moelink.scheduler import CacheConfig, Scheduler, SchedulerConfig

    return Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=kw.pop("budget", 64), max_model_len=512),
                     CacheConfig(block_size=4, num_kv_blocks=16, enable_prefix_caching=True, num_state_slots=4,
                                 num_state_checkpoints=2), kv_connector=connector)


def test_with_per_sequence_state_the_save_is_at_the_prompts_n_minus_1_with_its_slot():
    """The prompt's chunk ends at n - 1 (the state there is what the decode side continues from), the save rides
    with that step (n - 1 tokens, its blocks and the request's state slot), and the last token runs next."""
    s = _hybrid_scheduler(FakeConnector(save=True))
    s.add_request(make_request("a", list(range(10)), max_tokens=1))
    so = s.schedule()  # the state checkpoint's own chunk end first (the last whole block before the final token)
    assert so.num_scheduled_tokens == {"a": 8} and not (so.kv_transfers and so.kv_transfers.saves)
    _report(s, so, None)
    so = s.schedule()
    assert so.num_scheduled_tokens == {"a": 1}
    (t,) = so.kv_transfers.saves
    slot = s.kv.state_slot("a")
    assert (t.num_tokens, t.token_ids, len(t.block_ids), t.state_slot) == (9, tuple(range(9)), 3, slot) and slot >= 0
    _report(s, so, {t.transfer_id: True})
    so = s.schedule()
    assert so.num_scheduled_tokens == {"a": 1} and not (so.kv_transfers and so.kv_transfers.saves)
    s.check_invariants()


def test_with_per_sequence_state_a_load_moves_n_minus_1_tokens_and_its_slot_takes_the_state():
    """The decode side loads n - 1 tokens into the request's blocks and slot; admitted, its slot is not overwritten
    by a prefix hit's checkpoint (state_copy_from -1) and it computes the last prompt token."""
    prompt = list(range(10))
    conn = FakeConnector({"a": prompt}, prompts={"a": prompt})
    s = _hybrid_scheduler(conn)
    s.add_request(make_request("a", prompt, max_tokens=4))
    so = s.schedule()
    (t,) = so.kv_transfers.loads
    assert (t.num_tokens, t.first_block, t.state_slot) == (9, 0, s.kv.state_slot("a")) and t.state_slot >= 0
    _report(s, so, {t.transfer_id: True})
    so = s.schedule()
    (new,) = so.scheduled_new_reqs
    assert so.num_scheduled_tokens == {"a": 1} and new.num_computed_tokens == 9
    assert (new.state_slot, new.state_copy_from) == (t.state_slot, -1)
    s.check_invariants()


def test_with_per_sequence_state_a_one_token_prompt_moves_nothing():
    s = _hybrid_scheduler(FakeConnector(save=True))
    s.add_request(make_request("a", [7], max_tokens=1))
    so = s.schedule()
    assert so.num_scheduled_tokens == {"a": 1} and (so.kv_transfers is None or not so.kv_transfers.saves)
    conn = FakeConnector({"b": [7]}, prompts={"b": [7]})
    s = _hybrid_scheduler(conn)
    s.add_request(make_request("b", [7], max_tokens=1))
    so = s.schedule()
    assert so.num_scheduled_tokens == {"b": 1} and (so.kv_transfers is None or not so.kv_transfers.loads)


def test_with_per_sequence_state_a_prefix_hit_reaching_the_save_point_is_not_used():
    """n - 1 on a block boundary with a state checkpoint there: a hit would leave no step ending at the save point
    (no slot holding that state), so the saved request computes its prompt from the start and saves there."""
    prompt = list(range(9))  # n - 1 = 8: two whole blocks of 4, the checkpoint boundary too
    s = _hybrid_scheduler(FakeConnector(save={"b"}))
    s.add_request(make_request("a", prompt, max_tokens=1))
    so = s.schedule()
    assert so.num_scheduled_tokens == {"a": 8} and so.state_saves  # a checkpoint at 8
    _report(s, so, None)
    so = s.schedule()
    _report(s, so, None, {"a": [5]})
    assert s.kv.get_computed_blocks(make_request("x", prompt))[1] == 8  # an identical prompt would hit 8 tokens
    s.add_request(make_request("b", prompt, max_tokens=1))
    so = s.schedule()
    assert so.num_scheduled_tokens == {"b": 8}  # from 0, not from the hit
    (t,) = so.kv_transfers.saves
    assert (t.req_id, t.num_tokens, t.state_slot) == ("b", 8, s.kv.state_slot("b"))
    (new,) = so.scheduled_new_reqs
    assert (new.num_computed_tokens, new.state_copy_from) == (0, -1)
    s.check_invariants()


def test_a_load_only_request_ends_with_an_error_where_it_would_be_recomputed():
    """A request that can only load its KV (Request.must_load: a decode request whose images came without pixels,
    scheduler/load_only.py): a failed load ends it with an error naming why, its blocks freed; a KV preemption takes
    a recomputable request first and ends it only when it is the last candidate."""
    store = {"ld": [5, 6, 7], "x": [8, 9, 10]}
    conn = FakeConnector(store, prompts=dict(store))
    s = _scheduler(conn)
    s.add_request(make_request("x", [8, 9, 10], max_tokens=2, must_load="it has no pixels"))
    so = s.schedule()
    (t,) = so.kv_transfers.loads
    outs = _report(s, so, {t.transfer_id: False})
    assert [(o.request_id, o.finish_reason) for o in outs] == [("x", "error")]
    assert "KV load failed" in outs[0].stop_reason and "it has no pixels" in outs[0].stop_reason
    assert s.get_request("x") is None and s.stats().num_free_blocks == 16 and not s.has_unfinished_requests()
    s.check_invariants()
    # Preemption: a (oldest, plain), ld (load-only, loaded), b (newest, plain); the pool runs dry.
    s = _scheduler(FakeConnector(store, prompts=dict(store)), num_blocks=5, block_size=2)
    s.add_request(make_request("a", [1, 2], max_tokens=20))
    s.add_request(make_request("ld", [5, 6, 7], max_tokens=20, must_load="it has no pixels"))
    s.add_request(make_request("b", [3, 4], max_tokens=20))
    so = s.schedule()  # a and b computed (a block each), ld loading (two blocks)
    (t,) = so.kv_transfers.loads
    ended: list = []
    ended += _report(s, so, {t.transfer_id: True}, {"a": [1], "b": [1]})
    preempted: set = set()
    for _ in range(12):
        so = s.schedule()
        preempted |= so.preempted_req_ids
        ended += _report(s, so, None, {r: [1] for r in so.num_scheduled_tokens})
        s.check_invariants()
        if s.get_request("ld") is None:
            break
    assert "b" in preempted and "ld" not in preempted  # b (recomputable) went first, though ld came before it
    errors = [o for o in ended if o.finish_reason == "error"]
    assert [o.request_id for o in errors] == ["ld"] and "preempted" in errors[0].stop_reason
    s.finish_requests(["a", "b"], RequestStatus.FINISHED_ABORTED)
    assert s.stats().num_free_blocks == 5
