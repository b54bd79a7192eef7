"""Rank processes reused across engines (engine/cluster/rank_pool.py, issue 55): a Ray executor that shuts down
cleanly on a Ray it did not start parks its ranks, and the next engine of as many ranks takes the same processes,
re-initialized (same greedy tokens as a fresh start); one of another size clears them first; an engine with a rank
loss not yet recovered, or one that started its own Ray, parks nothing (survivors parked after a recovery, and a rank
that does not answer its park: tests/ep/test_ep_elastic.py)."""
from __future__ import annotations

import gc
import os

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.cluster.rank_pool import RANK_POOL, Parked, RankPool

from tests.helpers.waits import wait_until

pytestmark = pytest.mark.slow

# The tests without a Ray come first: a module whose first test is not on the suite's shared Ray runs after every
# module that is (tests/conftest.py orders the Ray group so), so the `RANK_POOL.clear()`s of the Ray test below no
# longer kill the ranks the modules after it had parked (8 fresh rank starts of tests/ep/test_tp_*.py, ~2.4 s of CPU
# each), for one more start of the shared Ray (~4 s).

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13]]


def _run(path, ep: int):
    with LLM(path, dtype="float32", expert_parallel_size=ep, num_kv_blocks=64, skip_warmup=True) as llm:
        pids = list(llm.engine.executor.rank_pids)
        tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    return pids, tokens


def _threads(pids) -> list[int]:
    return [len(os.listdir(f"/proc/{pid}/task")) for pid in pids]


def test_a_parked_engine_not_taken_in_time_is_cleared():
    """An idle Ray worker wakes every 10 ms (its signal check): a parked engine nobody takes within idle_s is cleared,
    its resources back. (No Ray here: a pool entry with no processes; clearing one with Ray down kills nothing.)"""
    pool = RankPool(enabled=True, idle_s=0.05)
    pool.put(Parked("session", 2, False, None, []))
    assert len(pool) == 1
    wait_until(lambda: len(pool) == 0, 10.0, "the untaken parked engine to be cleared")


class _ParkingRank:
    """What Worker.park touches of a rank: a runner (with a model and a KV cache) it releases, in a Ray actor."""

    def __init__(self, cycle: bool):
        self.runner = _Runner(cycle)
        self.device = torch.device("cpu")
        self.tp = None

    def shutdown(self):
        pass

    def release_runner(self):
        self.runner = None

    @staticmethod
    def _own_process():
        return True


class _Runner:
    def __init__(self, cycle: bool):
        self.stream = _Stream()
        self.model = torch.nn.Linear(2, 2)
        self.kv_caches = [(torch.zeros(2), torch.zeros(2))]
        self.me = self if cycle else None  # a cycle: only the collector frees this runner


class _Stream:
    def shutdown(self):
        pass


def test_a_park_collects_the_whole_heap_only_when_the_engine_is_not_gone(monkeypatch):
    """Worker.park (engine/rank/worker.py) thaws and collects the rank's whole heap (~0.17 s of CPU) only one park in
    PARK_FULL_COLLECTION_EVERY while the old engine's runner, model and KV cache went by reference counting, and at
    every park whose engine is still held (here by a cycle). (No Ray: the rank is a stand-in, the collector counted.)"""
    from moelink.engine.contract import gc_policy
    from moelink.engine.rank.worker import Worker

    calls = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append("collect") or 0)
    monkeypatch.setattr(gc, "unfreeze", lambda: calls.append("unfreeze"))
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(gc_policy, "_parks_without_collection", 0, raising=False)
    every = getattr(gc_policy, "PARK_FULL_COLLECTION_EVERY", 8)
    full = []
    for _ in range(2 * every):
        calls.clear()
        assert Worker.park(_ParkingRank(cycle=False)) == os.getpid()
        assert calls in ([], ["unfreeze", "collect", "freeze"])
        full.append(bool(calls))
    assert full == ([False] * (every - 1) + [True]) * 2
    for _ in range(3):  # held by a cycle: collected every time, whatever the count
        calls.clear()
        Worker.park(_ParkingRank(cycle=True))
        assert calls == ["unfreeze", "collect", "freeze"]


def test_an_engine_of_as_many_ranks_reuses_the_parked_processes(local_ray, tiny_model):
    assert RANK_POOL.enabled  # the shared Ray of tests/ep turns it on
    RANK_POOL.clear()
    path = tiny_model("qwen3_e6k3")
    saved = RANK_POOL.starts_saved
    pids, tokens = _run(path, 2)
    assert len(RANK_POOL) == 1  # parked, not killed
    threads = _threads(pids)
    again, tokens_again = _run(path, 2)
    assert again == pids and tokens_again == tokens and RANK_POOL.starts_saved == saved + 2
    # A parked process keeps none of the engine's threads (its step stream's thread ends at park): as many as after
    # the first engine, not one more per engine served.
    assert _threads(pids) == threads
    # Another size: four fresh processes start beside the parked pair (room for both), then both sizes are parked;
    # an engine of two takes the pair back.
    four, tokens_four = _run(path, 4)
    assert not set(four) & set(pids) and tokens_four == tokens and len(RANK_POOL) == 2
    assert _run(path, 2)[0] == pids and _run(path, 4)[0] == four
    # No room (a fresh start of three with two CPUs free beside the six parked): the oldest parked (the pair) are
    # cleared first, as many as make room; the four stay.
    assert RANK_POOL.take(RANK_POOL._parked[0].session, 3, False, free=2) is None
    assert [p.num_ranks for p in RANK_POOL._parked] == [4]
    RANK_POOL.clear()
    assert len(RANK_POOL) == 0
    total = local_ray.cluster_resources().get("CPU", 0)
    wait_until(lambda: local_ray.available_resources().get("CPU", 0) == total, 30.0, "the parked ranks' CPUs back")
