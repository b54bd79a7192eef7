"""The driver's online-EPLB controller (engine/cluster/eplb_controller.py) against fake ranks, and its config flag."""
from __future__ import annotations

import numpy as np
import pytest

from moelink.engine.config.parallel import ParallelConfig
from moelink.engine.cluster.eplb_controller import EPLBController
from moelink.moe.placement import ExpertPlacement

L, G, R = 3, 8, 4


class FakeRanks:
    """Records the collective calls; each rank 'moves' (and switches) the layers eplb_move names, reports 10
    bytes sent and 7 staged at the end, and slots of 100 bytes."""

    def __init__(self):
        self.calls, self.staged, self.placements = [], 0, None

    def __call__(self, method, *args):
        self.calls.append(method)
        self.args = args
        if method == "eplb_begin":
            self.pending, self.staged = args[0], 0
            return [None] * R
        if method == "eplb_move":
            self.staged += args[0]
            return [self.staged >= L] * R
        if method == "eplb_commit":
            self.placements = self.pending
            return [(10, 7)] * R
        if method == "eplb_slot_bytes":
            return [[100] * L] * R
        raise AssertionError(method)


def _skewed_step():
    counts = np.full((L, G), 2, dtype=np.int64)
    counts[:, [4, 5]] = 12  # half the pairs to experts 4 and 5, both on rank 2
    return counts


def test_rebalances_every_interval_moving_one_layer_per_step():
    placement = ExpertPlacement(num_experts=G, ep_size=R, num_redundant=4)
    ctl = EPLBController(5, placement, L)
    ranks = FakeRanks()
    for _ in range(4):
        ctl.after_step(_skewed_step(), ranks)
    assert ranks.calls == [] and ctl.rebalances == 0
    before = ctl.measured_imbalance()
    ctl.after_step(_skewed_step(), ranks)  # step 5: plan, and the first layer moves
    assert ranks.calls == ["eplb_slot_bytes", "eplb_begin", "eplb_move"] and ctl.moving
    ctl.after_step(_skewed_step(), ranks)
    # Each chunk's layer switched on the ranks: it serves on its new placement, the rest on the old one.
    assert ctl.moving and ctl.placements[2] == placement and ctl.placements[:2] == ctl.pending.placements[:2]
    ctl.after_step(_skewed_step(), ranks)  # the third layer: commit at this step boundary
    assert ranks.calls == ["eplb_slot_bytes", "eplb_begin", "eplb_move", "eplb_move", "eplb_move", "eplb_commit"]
    snap = ctl.snapshot()
    assert snap["peak_staged_bytes"] == 7 and snap["bytes_staged"] > 0 and snap["plans_refused"] == 0
    assert snap["staging_budget_bytes"] == 100 * max(placement.slots_per_rank)  # default: one layer's slots
    assert not ctl.moving and ctl.rebalances == 1 and ctl.bytes_moved == 10 * R
    assert list(ctl.placements) == list(ranks.placements)
    snap = ctl.snapshot()
    assert snap["predicted_imbalance_after"] < snap["predicted_imbalance_before"]
    assert snap["predicted_imbalance_before"] == pytest.approx(before)
    # Under the new placement the window's measured imbalance is the predicted one (same load).
    assert ctl.measured_imbalance() == pytest.approx(snap["predicted_imbalance_after"])
    assert len(ctl.experts_on_ranks_per_layer()) == L
    # The Prometheus families carry the same numbers.
    from moelink.engine.core.metrics import eplb_families

    fams = {f.name: f for f in eplb_families(ctl.snapshot())}
    assert fams["moelink_eplb_expert_bytes_moved"].samples[0].value == 10 * R
    predicted = {tuple(x.labels.values()): x.value for x in fams["moelink_eplb_rank_imbalance"].samples}
    assert predicted[("predicted", "after")] == pytest.approx(snap["predicted_imbalance_after"])
    # Same load at the next interval: the placement is already the best EPLB finds, nothing moves.
    for _ in range(5):
        ctl.after_step(_skewed_step(), ranks)
    assert ranks.calls.count("eplb_begin") == 1
    # A small gain is not worth a move: the skew shifts slightly, EPLB finds a different placement, gain < 0.5.
    lazy = EPLBController(5, ctl.placements[0], L, min_gain=0.5)
    lazy.placements = ctl.placements
    shifted = _skewed_step()
    shifted[:, 0] += 3
    for _ in range(5):
        lazy.after_step(shifted, ranks)
    assert ranks.calls.count("eplb_begin") == 1 and not lazy.moving
    with pytest.raises(ValueError, match="min_gain"):
        EPLBController(5, ctl.placements[0], L, min_gain=-1)


def test_no_load_no_move_and_validation():
    ctl = EPLBController(2, ExpertPlacement(num_experts=G, ep_size=R), L)
    ranks = FakeRanks()
    for _ in range(4):
        ctl.after_step(np.zeros((L, G), dtype=np.int64), ranks)
    assert ranks.calls == []
    with pytest.raises(ValueError, match="interval"):
        EPLBController(0, ExpertPlacement(num_experts=G, ep_size=R), L)
    with pytest.raises(ValueError, match="eplb_interval"):
        ParallelConfig(expert_parallel_size=2, eplb_interval=-1)
    with pytest.raises(ValueError, match="expert_parallel_size > 1"):
        ParallelConfig(expert_parallel_size=1, eplb_interval=4)
    assert ParallelConfig(expert_parallel_size=2, eplb_interval=4).eplb_interval == 4


def test_cli_flag_reaches_the_config():
    import argparse

    from moelink.engine.api.cli_args import add_engine_args, engine_args_from

    p = argparse.ArgumentParser()
    add_engine_args(p)
    ns = p.parse_args(["m", "--expert-parallel-size", "2", "--eplb-interval", "16", "--eplb-staging-mb", "1.5"])
    par = engine_args_from(ns).parallel_config()
    assert par.eplb_interval == 16 and par.eplb_staging_mb == 1.5
    for bad in (0, -1.0, True, "8"):
        with pytest.raises(ValueError, match="eplb_staging_mb.*--eplb-staging-mb"):
            ParallelConfig(expert_parallel_size=2, eplb_interval=4, eplb_staging_mb=bad)


def _rebalance_once(ctl, ranks):
    for _ in range(ctl.interval):
        ctl.after_step(_skewed_step(), ranks)


def test_staging_budget_cuts_chunks_and_refuses_a_layer_over_it():
    """The driver cuts a move into chunks that each stage at most the budget on every rank (whole layers),
    and refuses (counted, the placement unchanged) a plan whose single layer needs more."""
    from moelink.engine.core.metrics import eplb_families
    from moelink.moe.expert_move import chunk_staging_bytes, plan_moves

    placement = ExpertPlacement(num_experts=G, ep_size=R, num_redundant=4)
    # What one layer of the plan stages at most on one rank (100-byte slots): the budget's threshold.
    probe = EPLBController(5, placement, L, chunk_layers=L)
    probe_ranks = FakeRanks()
    _rebalance_once(probe, probe_ranks)
    new = probe.placements
    per_layer = [max(chunk_staging_bytes(plan_moves((placement,) * L, new), [100] * L, l, l + 1, R))
                 for l in range(L)]
    assert probe_ranks.calls.count("eplb_move") == 1  # default budget: all L layers in one chunk
    assert probe.snapshot()["staging_budget_bytes"] == 100 * 3 * L
    # A budget of one layer's worst: three layers, chunk_layers=3, but one layer per chunk.
    ctl = EPLBController(5, placement, L, chunk_layers=L, staging_bytes=max(per_layer))
    ranks = FakeRanks()
    _rebalance_once(ctl, ranks)
    while ctl.moving:
        ctl.after_step(_skewed_step(), ranks)
    assert ranks.calls.count("eplb_move") == L and ctl.rebalances == 1
    assert ctl.snapshot()["bytes_staged"] == sum(sum(chunk_staging_bytes(plan_moves((placement,) * L, new),
                                                                          [100] * L, l, l + 1, R)) for l in range(L))
    # One byte less: no layer fits, the plan is refused, nothing moves, the placement stays.
    tight = EPLBController(5, placement, L, staging_bytes=max(per_layer) - 1)
    tight_ranks = FakeRanks()
    _rebalance_once(tight, tight_ranks)
    assert "eplb_begin" not in tight_ranks.calls and not tight.moving and tight.rebalances == 0
    assert tight.plans_refused == 1 and tight.placements == (placement,) * L and tight.bytes_staged == 0
    fams = {f.name: f for f in eplb_families(tight.snapshot())}
    assert fams["moelink_eplb_plans_refused"].samples[0].value == 1
    assert fams["moelink_eplb_staging_budget_bytes"].samples[0].value == max(per_layer) - 1
    with pytest.raises(ValueError, match="staging_bytes"):
        EPLBController(5, placement, L, staging_bytes=0)
    # A budget below one expert slot could never move anything: refused when the slot sizes arrive (start-up).
    small = EPLBController(5, placement, L, staging_bytes=99)
    with pytest.raises(ValueError, match=r"--eplb-staging-mb allows 99 bytes per rank, below one expert slot"):
        small.set_slot_bytes([100] * L)


def test_engine_builds_the_controller_from_its_config():
    from types import SimpleNamespace as NS

    from moelink.engine.cluster.eplb_controller import make_eplb_controller

    def config(interval):
        return NS(parallel=NS(eplb_interval=interval, eplb_staging_mb=None),
                  model=NS(sparse_layers=[1, 2], moe=NS(router=NS(n_group=4))))

    plan = NS(placement=ExpertPlacement(num_experts=G, ep_size=R), node_of_rank=(0, 0, 1, 1))
    assert make_eplb_controller(config(0), plan) is None
    ctl = make_eplb_controller(config(8), plan)
    assert (ctl.interval, ctl.num_groups, ctl.node_of_rank, len(ctl.placements)) == (8, 4, (0, 0, 1, 1), 2)


def test_engine_asks_slot_sizes_at_start_up_and_refuses_a_budget_no_expert_fits(tiny_model):
    """LLMEngine asks the ranks their expert slot sizes as it starts (a stand-in executor here): the default
    budget follows from them, and a --eplb-staging-mb below one slot fails the start, the ranks shut down."""
    from moelink.engine import EngineArgs
    from moelink.engine.core.llm_engine import LLMEngine

    class Ranks:
        def __init__(self):
            self.calls, self.shut = [], False

        def collective(self, method, *args):
            self.calls.append(method)
            assert method == "eplb_slot_bytes"
            return [[4096, 4096]] * 2

        def shutdown(self):
            self.shut = True

    def config(mb):
        return EngineArgs(model=tiny_model("qwen3_e6k3"), expert_parallel_size=2, eplb_interval=4, eplb_staging_mb=mb,
                          dtype="float64", num_kv_blocks=16, executor="ray",
                          skip_warmup=True).create_engine_config()  # the stand-in has no worker to warm

    ranks = Ranks()
    eng = LLMEngine(config(None), executor=ranks)
    assert ranks.calls == ["eplb_slot_bytes"] and eng.eplb.slot_bytes_L == [4096, 4096] and not ranks.shut
    assert eng.eplb.staging_budget() == 4096 * max(eng.ep_plan.placement.slots_per_rank)
    ranks = Ranks()
    with pytest.raises(ValueError, match=r"--eplb-staging-mb allows 1048 bytes per rank, below one expert slot of this model \(4096 bytes"):
        LLMEngine(config(0.001), executor=ranks)
    assert ranks.shut
