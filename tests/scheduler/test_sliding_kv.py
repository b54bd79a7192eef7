"""The sliding-window group's own block table (scheduler/sliding_kv.py): blocks that leave the window are freed
while a request runs, the freed ids are reused, and nothing a query can still see is ever overwritten.

Oracle: the scheduler simulation's fake worker (tests/helpers/scheduler_sim.py), extended to keep the sliding
table as a real worker does (only new ids arrive; it nulls entries by the same window rule) and to write each
token's fingerprint into both groups' blocks. Before a chunk from p it checks every full-table position
[0, p) and every sliding position the chunk can see, [p - W + 1, p), read back their own prefix.
"""
from __future__ import annotations

import random

import pytest

from moelink.scheduler import CacheConfig, Scheduler, SchedulerConfig
from moelink.scheduler.sliding_kv import NULL_BLOCK, first_live_sliding_block

from tests.helpers.scheduler_sim import FakeWorker, Sim, make_request, reference_generate


class SlidingFakeWorker(FakeWorker):
    def __init__(self, num_blocks, block_size, window):
        super().__init__(num_blocks, block_size)
        self.window = window
        self.sliding: dict[str, list[int]] = {}

    def execute(self, so):
        for rid in so.finished_req_ids | so.preempted_req_ids:
            self.sliding.pop(rid, None)
        for nr in so.scheduled_new_reqs:
            self.sliding[nr.req_id] = list(nr.sliding_block_ids)
            assert len(nr.sliding_block_ids) == len(nr.block_ids)
        for cr in so.scheduled_cached_reqs:
            self.sliding[cr.req_id].extend(cr.new_sliding_block_ids)
        out = super().execute(so)  # the full group's reads and writes, and the sampled tokens
        starts = {rid: self.reqs[rid].num_computed - n for rid, n in so.num_scheduled_tokens.items()}
        # Before any sliding write of this step: what each chunk's first query sees in its window is intact
        # (so no block it could see was freed and handed out, to either group).
        for rid, start in starts.items():
            st, table = self.reqs[rid], self.sliding[rid]
            s0 = first_live_sliding_block(start, self.window, self.bs)
            table[:s0] = [NULL_BLOCK] * min(s0, len(table))
            live = [b for b in table if b != NULL_BLOCK]
            assert len(set(live)) == len(live) and not set(live) & set(st.block_ids), f"{rid}: block in two tables"
            for p in range(max(0, start - self.window + 1), start):
                assert self.kv[table[p // self.bs]][p % self.bs] == st.fps[p], f"{rid}: window KV at {p} lost"
        for rid, n in so.num_scheduled_tokens.items():
            st, table = self.reqs[rid], self.sliding[rid]
            for p in range(starts[rid], starts[rid] + n):
                self.kv[table[p // self.bs]][p % self.bs] = st.fps[p]
        return out


def sliding_sim(num_blocks=64, block_size=4, window=6, max_num_seqs=8, budget=16, prefix_caching=True):
    sched = Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=512),
                      CacheConfig(block_size=block_size, num_kv_blocks=num_blocks,
                                  enable_prefix_caching=prefix_caching, sliding_window=window))
    sim = Sim(sched)
    sim.worker = SlidingFakeWorker(num_blocks, block_size, window)
    return sim


def test_a_long_decode_frees_sliding_blocks_and_leaks_none():
    sim = sliding_sim(num_blocks=64)
    sim.sched.add_request(make_request("a", list(range(1, 9)), max_tokens=60))
    pool = sim.sched.kv.pool
    free = []
    while sim.sched.has_unfinished_requests():
        sim.step()
        free.append(pool.num_free_blocks)
        if sim.sched.has_unfinished_requests():
            live = [b for b in sim.sched.kv.get_sliding_block_ids("a") if b != NULL_BLOCK]
            assert len(live) <= -(-6 // 4) + 2  # the window's blocks only (6 tokens over 4-token blocks)
    sim.step()
    assert any(b > a for a, b in zip(free, free[1:])), "no step gave sliding blocks back"
    # 68 tokens hold 17 full blocks; without freeing the sliding table would hold 17 more.
    assert min(free) >= 64 - 17 - 3
    assert sim.tokens["a"] == reference_generate(list(range(1, 9)), max_tokens=60)[0]
    assert pool.num_free_blocks == pool.num_blocks


@pytest.mark.parametrize("seed", range(12))
def test_random_simulation_with_preemption_and_prefix_hits(seed):
    rng = random.Random(seed)
    sim = sliding_sim(num_blocks=rng.choice([36, 48, 80]), block_size=rng.choice([2, 4]),
                      window=rng.choice([3, 6, 9]), budget=rng.choice([8, 16]))
    shared = [rng.randrange(1, 50) for _ in range(24)]
    want = {}
    for i in range(10):
        prompt = (shared[: rng.randint(8, 24)] if rng.random() < 0.6 else []) + [
            rng.randrange(1, 50) for _ in range(rng.randint(1, 12))]
        max_tokens = rng.randint(1, 20)
        sim.sched.add_request(make_request(f"r{i}", prompt, max_tokens=max_tokens))
        want[f"r{i}"] = reference_generate(prompt, max_tokens=max_tokens)[0]
    sim.run()
    assert dict(sim.tokens) == want
    sim.sched.kv.pool.check_invariants()


def test_prefix_hits_reach_through_the_sliding_group():
    """A second request with the same 16-token prefix hits it (both groups' blocks cached) and is exact."""
    sim = sliding_sim(num_blocks=64, block_size=4, window=6)
    prefix = list(range(1, 17))
    sim.sched.add_request(make_request("a", prefix + [20], max_tokens=3))
    sim.run()
    sim.sched.add_request(make_request("b", prefix + [21, 22], max_tokens=3))
    sim.run()
    assert sim.cached["b"] == 16
    assert sim.tokens["b"] == reference_generate(prefix + [21, 22], max_tokens=3)[0]


def test_preemption_under_a_tight_pool_stays_exact():
    sim = sliding_sim(num_blocks=20, block_size=4, window=6, budget=8)
    want = {}
    for i in range(4):
        prompt = [i + 1] * (10 + i)
        sim.sched.add_request(make_request(f"p{i}", prompt, max_tokens=30))
        want[f"p{i}"] = reference_generate(prompt, max_tokens=30)[0]
    sim.run()
    assert sim.sched.num_preemptions_total > 0
    assert dict(sim.tokens) == want


def test_sliding_window_config_is_checked():
    with pytest.raises(ValueError, match=r"CacheConfig.sliding_window=0 is invalid: must be None or a positive"):
        CacheConfig(block_size=4, num_kv_blocks=8, sliding_window=0)


def test_without_a_window_the_scheduler_keeps_one_table():
    """CacheConfig.sliding_window None (every model without paired sliding layers): today's manager, no
    sliding ids on the wire."""
    from moelink.scheduler.kv_cache_manager import KVCacheManager
    from tests.helpers.scheduler_sim import make_scheduler

    sched = make_scheduler(num_blocks=16)
    assert type(sched.kv) is KVCacheManager and sched.pool_tokens == 64
    sched.add_request(make_request("a", [1, 2, 3, 4, 5], max_tokens=2))
    so = sched.schedule()
    assert so.scheduled_new_reqs[0].sliding_block_ids == [] and len(so.scheduled_new_reqs[0].block_ids) == 2
