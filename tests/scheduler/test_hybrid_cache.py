"""One cache for paged KV and per-sequence state (scheduler/hybrid_cache.py, scheduler/state_slots.py).

Oracle: the scheduler simulation's fake worker (tests/helpers/scheduler_sim.py), extended with what a
linear-attention layer keeps: one state per slot, updated in place by every token, which must equal the
fingerprint of exactly the tokens before the chunk that reads it. A slot handed to two requests, a checkpoint
copied before it was saved or after it was overwritten, a prefix hit resumed from a state of another prefix, a
preempted request resumed from a stale state: each fails that check at the step it happens.
"""
from __future__ import annotations

import random

import pytest

from moelink.scheduler import CacheConfig, Scheduler, SchedulerConfig
from moelink.scheduler.hybrid_cache import HybridCacheManager, checkpoint_boundary
from moelink.scheduler.kv_cache_manager import KVCacheManager
from moelink.scheduler.request import RequestStatus
from moelink.scheduler.state_slots import StateCheckpoints, StateSlots

from tests.helpers.scheduler_sim import FakeWorker, Sim, make_request, reference_generate


class StateFakeWorker(FakeWorker):
    """FakeWorker + one recurrent state per slot (module docstring). Copies in before the forward, saves after."""

    def __init__(self, num_blocks, block_size, **kw):
        super().__init__(num_blocks, block_size, **kw)
        self.state: dict[int, int] = {}
        self.slot_of: dict[str, int] = {}
        self.num_copies_in = 0

    @staticmethod
    def _prefix_fp(st, n: int) -> int:
        return st.fps[n - 1] if n else 0

    def execute(self, so):
        for rid in so.finished_req_ids | so.preempted_req_ids:
            self.slot_of.pop(rid, None)
        for nr in so.scheduled_new_reqs:
            assert nr.state_slot >= 0, f"{nr.req_id} admitted without a state slot"
            assert nr.state_slot not in self.slot_of.values(), f"{nr.req_id}: slot {nr.state_slot} held twice"
            self.slot_of[nr.req_id] = nr.state_slot
            if nr.num_computed_tokens == 0:
                self.state[nr.state_slot] = 0
            else:
                assert nr.state_copy_from >= 0, f"{nr.req_id} resumes at {nr.num_computed_tokens} with no state"
                self.state[nr.state_slot] = self.state[nr.state_copy_from]
                self.num_copies_in += 1
        starts = {}
        for rid, n in so.num_scheduled_tokens.items():
            # the request's computed count before this step, as the base worker will read it
            starts[rid] = (self.reqs[rid].num_computed if rid in self.reqs else
                           next(nr.num_computed_tokens for nr in so.scheduled_new_reqs if nr.req_id == rid))
        out = super().execute(so)
        for rid, n in so.num_scheduled_tokens.items():
            st, slot = self.reqs[rid], self.slot_of[rid]
            assert self.state[slot] == self._prefix_fp(st, starts[rid]), \
                f"{rid}: state at {starts[rid]} is not its prefix's"
            self.state[slot] = self._prefix_fp(st, starts[rid] + n)
        for rid, ck in so.state_saves.items():
            self.state[ck] = self.state[self.slot_of[rid]]
        return out


def hybrid_sim(num_blocks=64, block_size=4, max_num_seqs=8, budget=16, slots=None, ckpts=4, prefix_caching=True,
               overlap=False):
    sched = Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=512),
                      CacheConfig(block_size=block_size, num_kv_blocks=num_blocks,
                                  enable_prefix_caching=prefix_caching,
                                  num_state_slots=slots or max_num_seqs, num_state_checkpoints=ckpts))
    sim = Sim(sched, overlap=overlap)
    sim.worker = StateFakeWorker(num_blocks, block_size)
    return sim


def test_the_scheduler_picks_the_hybrid_manager_from_the_cache_config():
    assert isinstance(hybrid_sim().sched.kv, HybridCacheManager)
    with pytest.raises(ValueError, match="num_state_checkpoints"):
        CacheConfig(num_kv_blocks=8, num_state_checkpoints=2)
    with pytest.raises(ValueError, match="sliding_window"):
        CacheConfig(num_kv_blocks=8, num_state_slots=2, sliding_window=4)
    with pytest.raises(ValueError, match="num_state_slots=-1"):
        CacheConfig(num_kv_blocks=8, num_state_slots=-1)


def test_checkpoint_boundary_is_the_last_whole_block_before_the_final_token():
    assert [checkpoint_boundary(n, 4) for n in (1, 4, 5, 8, 9, 10)] == [0, 0, 4, 4, 8, 8]


@pytest.mark.parametrize("overlap", [False, True])
def test_outputs_equal_the_oracle_and_every_slot_comes_back(overlap):
    sim = hybrid_sim(overlap=overlap)
    rng = random.Random(3)
    prompts = {f"r{i}": [rng.randrange(1, 50) for _ in range(rng.randrange(1, 40))] for i in range(12)}
    for rid, p in prompts.items():
        sim.sched.add_request(make_request(rid, p, max_tokens=rng.randrange(1, 12)))
    sim.run()
    for rid, p in prompts.items():
        assert sim.tokens[rid] == reference_generate(p, max_tokens=len(sim.tokens[rid]))[0]
    assert sim.sched.kv.slots.num_free == sim.sched.kv.slots.num_slots


def test_no_free_slot_holds_admission_back():
    """Two slots for four requests: two run at a time, whatever the blocks allow."""
    sim = hybrid_sim(max_num_seqs=4, slots=2)
    for i in range(4):
        sim.sched.add_request(make_request(f"r{i}", [1, 2, 3, 4, 5], max_tokens=6))
    so = sim.step()
    assert len(so.scheduled_new_reqs) == 2
    sim.run()
    assert all(len(sim.tokens[f"r{i}"]) == 6 for i in range(4))


def test_a_shared_prefix_resumes_from_a_checkpoint_and_gives_the_same_tokens():
    sim = hybrid_sim(budget=64)
    prompt = list(range(1, 19))  # 18 tokens: checkpoint boundary 16
    sim.sched.add_request(make_request("a", prompt, max_tokens=5))
    sim.run()
    # The prompt's boundary 16, and the decode's tail at 20 (written 19..22: one boundary crossed).
    assert sim.sched.kv.ckpts.num_saved == 2
    sim.sched.add_request(make_request("b", prompt + [7, 8], max_tokens=5))
    so = sim.step()
    (new,) = so.scheduled_new_reqs
    assert new.num_computed_tokens == 16 and new.state_copy_from >= sim.sched.kv.slots.num_slots
    sim.run()
    assert sim.worker.num_copies_in == 1
    assert sim.cached["b"] == 16
    assert sim.tokens["b"] == reference_generate(prompt + [7, 8], max_tokens=5)[0]


def test_a_kv_hit_without_a_checkpoint_is_not_used():
    """KV alone cannot resume a recurrent state: a hit whose boundary has no checkpoint is recomputed."""
    sim = hybrid_sim(budget=64, ckpts=0)
    prompt = list(range(1, 19))
    sim.sched.add_request(make_request("a", prompt, max_tokens=3))
    sim.run()
    sim.sched.add_request(make_request("b", prompt, max_tokens=3))
    so = sim.step()
    assert so.scheduled_new_reqs[0].num_computed_tokens == 0
    sim.run()
    assert sim.tokens["b"] == sim.tokens["a"]


def test_a_prompt_chunk_ends_at_its_checkpoint_boundary():
    sim = hybrid_sim(budget=64)
    sim.sched.add_request(make_request("a", list(range(1, 19)), max_tokens=2))
    so = sim.step()
    assert so.num_scheduled_tokens == {"a": 16} and so.state_saves and "a" in so.state_saves
    so = sim.step()
    assert so.num_scheduled_tokens == {"a": 2} and not so.state_saves


@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_with_preemption_prefix_hits_and_aborts(seed):
    """Few blocks (preemption), shared prefixes (hits from checkpoints), few checkpoints (evictions), aborts,
    the overlapped loop on odd seeds: every state read is its prefix's, every output the oracle's."""
    rng = random.Random(seed)
    sim = hybrid_sim(num_blocks=24, block_size=4, max_num_seqs=6, budget=rng.choice([8, 16, 32]), ckpts=3,
                     overlap=bool(seed % 2))
    bases = [[rng.randrange(1, 50) for _ in range(rng.randrange(4, 24))] for _ in range(3)]
    prompts = {}
    for i in range(16):
        p = list(rng.choice(bases)) + [rng.randrange(1, 50) for _ in range(rng.randrange(0, 8))]
        prompts[f"r{i}"] = p
        sim.sched.add_request(make_request(f"r{i}", p, max_tokens=rng.randrange(1, 10)))
    aborted = set()
    for _ in range(2000):
        if not sim.sched.has_unfinished_requests():
            break
        sim.step()
        if rng.random() < 0.03:
            live = sorted(sim.sched.requests)
            if live:
                rid = rng.choice(live)
                aborted.add(rid)
                sim.sched.finish_requests(rid, RequestStatus.FINISHED_ABORTED)
    sim.run()
    for rid, p in prompts.items():
        if rid not in aborted:
            assert sim.tokens[rid] == reference_generate(p, max_tokens=len(sim.tokens[rid]))[0], rid
    kv = sim.sched.kv
    assert kv.slots.num_free == kv.slots.num_slots
    assert sim.worker.num_copies_in > 0, "no request resumed from a checkpoint"


def test_a_rewind_recomputes_running_requests_and_gives_pending_saves_back():
    sim = hybrid_sim(budget=64)
    sim.sched.add_request(make_request("a", list(range(1, 19)), max_tokens=4))
    so = sim.sched.schedule()
    assert so.state_saves
    sim.sched.rewind(so)
    sim.sched.check_invariants()
    assert not sim.sched.running and sim.sched.requests["a"].num_computed_tokens == 0
    assert sim.sched.kv.slots.num_free == sim.sched.kv.slots.num_slots
    assert len(sim.sched.kv.ckpts) == 0 and sim.sched.kv.ckpts.reserve(b"x") is not None


def test_reset_prefix_cache_forgets_checkpoints():
    sim = hybrid_sim(budget=64)
    sim.sched.add_request(make_request("a", list(range(1, 19)), max_tokens=2))
    sim.run()
    assert len(sim.sched.kv.ckpts) == 1
    sim.sched.reset_prefix_cache()
    assert len(sim.sched.kv.ckpts) == 0


def test_slot_and_checkpoint_pools_alone():
    slots = StateSlots(2)
    assert slots.take("a") == 0 and slots.take("a") == 0 and slots.take("b") == 1 and slots.take("c") is None
    slots.release("a")
    assert slots.take("c") == 0
    slots.check_invariants()
    ck = StateCheckpoints(first=2, num=2)
    s1, s2 = ck.reserve(b"h1"), ck.reserve(b"h2")
    assert {s1, s2} == {2, 3} and ck.reserve(b"h3") is None, "pending saves are never evicted"
    assert ck.lookup(b"h1") is None, "a save is no hit before its step is taken"
    ck.commit(s1)
    ck.commit(s2)
    assert ck.lookup(b"h1") == s1
    s3 = ck.reserve(b"h3")  # evicts the least recently used: h2 (h1 was just looked up)
    assert s3 == s2 and ck.lookup(b"h2") is None
    ck.abandon(s3)
    ck.check_invariants()
    with pytest.raises(ValueError, match="num_slots"):
        StateSlots(0)


def test_the_hybrid_manager_refuses_a_sliding_group():
    from moelink.scheduler.sliding_kv import SlidingKVCacheManager
    with pytest.raises(ValueError, match="sliding"):
        HybridCacheManager(SlidingKVCacheManager(8, 4, True, 4, 16), 2, 0)
    HybridCacheManager(KVCacheManager(8, 4), 2, 0)


@pytest.mark.parametrize("overlap", [False, True])
def test_the_next_turn_resumes_from_the_last_decode_boundary(overlap):
    """A chat's next turn (this prompt + this answer + a new message) hits the answer's last block boundary: the
    request's rolling decode tail outlives it (SGLang keeps a finished request's state too). Under the overlapped
    loop the tail's block is keyed when its step is taken."""
    sim = hybrid_sim(budget=64, overlap=overlap)
    prompt = list(range(1, 19))  # 18 tokens, block 4: the prompt's checkpoint at 16
    sim.sched.add_request(make_request("a", prompt, max_tokens=12))
    sim.run()
    answer = sim.tokens["a"]
    # Written 19..29: tails at 20, 24, 28, each replacing the one before: the prompt's and the last tail remain.
    assert sim.sched.kv.ckpts.num_saved == 4 and len(sim.sched.kv.ckpts) == 2
    turn2 = prompt + answer + [5, 6, 7]
    sim.sched.add_request(make_request("b", turn2, max_tokens=4))
    so = sim.step()
    (new,) = so.scheduled_new_reqs
    assert new.num_computed_tokens == 28 and new.state_copy_from >= sim.sched.kv.slots.num_slots
    sim.run()
    assert sim.cached["b"] == 28
    assert sim.tokens["b"] == reference_generate(turn2, max_tokens=4)[0]
    sim.sched.kv.check_invariants()


def test_a_verify_step_saves_no_tail():
    """A step verifying drafts replays its state to the accepted tokens after the copy would run: no save."""
    sim = hybrid_sim(budget=64)
    req = make_request("a", list(range(1, 19)), max_tokens=8)
    sim.sched.add_request(req)
    sim.step()  # 16: the prompt's checkpoint
    sim.step()  # 18: the rest of the prompt
    req.spec_token_ids = [3, 4]  # drafts: the step writes 19 (input) + 2 drafts = 21, across the boundary at 20
    so = sim.sched.schedule()
    assert not so.state_saves
