"""Elastic EP under tensor parallelism (engine/cluster/elastic.py): a lost rank takes its whole TP group out, and
the other groups serve on.

Real Ray actor processes on gloo (127.0.0.1), the tiny float64 Qwen3-MoE at `-tp 2 -ep 4` (world 4: two TP groups,
two schedulers, the experts in EP over the four ranks). SIGKILL rank 3 mid-stream: ranks 2 and 3 (its group) go,
ranks 0 and 1 re-form as `-tp 2 -ep 2` with their runners rebuilt, every unfinished request is recomputed there,
and the outputs equal one rank's (float64 greedy outputs depend neither on the layout nor on a recompute). Then a
second loss leaves no whole group to go on with: the engine fails fast, naming the rank.
"""
from __future__ import annotations

import pytest

from moelink.engine.cluster.elastic import lost_tp_groups

from tests.helpers.elastic import PARAMS, PROMPTS, drain, engine, kill, loss_fails_fast, reference

pytestmark = pytest.mark.slow


def test_lost_tp_groups_are_whole_groups():
    assert lost_tp_groups({3}, 2) == {2, 3}
    assert lost_tp_groups({0, 5}, 2) == {0, 1, 4, 5}
    assert lost_tp_groups({1}, 4) == {0, 1, 2, 3}
    assert lost_tp_groups({2}, 1) == {2}


def test_sigkill_one_rank_of_a_tp_group_takes_the_group_out_and_the_rest_serve_on(local_ray, tiny_model):
    path = tiny_model("qwen3_e6k3")
    want = reference(path)
    prompts = PROMPTS[:8]
    eng = engine(path, expert_parallel_size=4, tensor_parallel_size=2, elastic_ep=True)
    ex = eng.executor
    try:
        assert len(eng.schedulers) == 2 and eng.config.parallel.rejoin_enabled is False
        for i, p in enumerate(prompts):
            eng.add_request(f"r{i}", p, PARAMS)
        assert all(s.num_running + s.num_waiting > 0 for s in eng.rank_stats()), "both groups should own requests"
        done: dict = {}
        streamed = 0
        while streamed < 2 * len(prompts):  # mid-stream: a few tokens out, none finished
            streamed += sum(1 for _ in eng.step())
        on_lost_group = sum(1 for g in eng._rank_of.values() if g == 1)
        assert on_lost_group > 0
        survivors_pids = ex.rank_pids[:2]
        kill(ex.rank_pids[3])
        got = drain(eng, done)
        stats = eng.elastic_stats
        assert stats.recoveries == 1 and stats.failed_recoveries == 0
        result = stats.history[0]
        # The whole group of rank 3 went (rank 2 was alive and killed with it); runners rebuilt under TP.
        assert result.dead_ranks == (2, 3) and result.survivors == (0, 1) and not result.kept_runners
        assert ex.world_size == 2 and ex.rank_pids == survivors_pids
        assert eng.config.parallel.expert_parallel_size == 2 and eng.config.parallel.tensor_parallel_size == 2
        assert len(eng.schedulers) == 1
        assert stats.requests_on_lost_ranks == on_lost_group
        assert got == {f"r{i}": want[f"r{i}"] for i in range(len(prompts))}
        for s in eng.rank_stats():
            assert s.num_free_blocks == s.num_total_blocks, s
        # One group left: a loss has nothing to go on with, and fails fast naming the rank as what it is (a rank
        # of TP group 0, not an "expert-parallel rank"), no recovery tried.
        loss_fails_fast(eng, 2, name="rank 1 (TP group 0)")
        assert stats.recoveries == 1 and stats.failed_recoveries == 0
    finally:
        eng.shutdown()
