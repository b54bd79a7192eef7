"""The node map of the two_level all-to-all: flags, validation, the plan, and the engine's counters.

Each bad input gets one error naming the field or flag and what is allowed.
"""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from moelink.comm.backends import BACKENDS
from moelink.comm.two_level import TwoLevelAllToAll, node_numbers
from moelink.engine.config.parallel import ParallelConfig
from moelink.engine.contract.expert_parallel import ExpertParallelPlan, plan_expert_parallel
from moelink.engine.core.moe_metrics import MoEMetrics
from moelink.moe.placement import ExpertPlacement
from moelink.moe.stats import MoECounters, MoEStats


def _par(**kw) -> ParallelConfig:
    return ParallelConfig(**{"expert_parallel_size": 4, "all_to_all": "two_level", **kw})


@pytest.mark.parametrize("size,nodes", [(2, (0, 0, 1, 1)), (1, (0, 1, 2, 3)), (4, (0, 0, 0, 0)), (72, (0, 0, 0, 0))])
def test_domain_size_groups_consecutive_ranks(size, nodes):
    assert _par(ep_nvlink_domain_size=size).node_of_rank() == nodes


def test_node_map_defaults_to_the_placement_group_and_ids_pass_through():
    assert _par().node_of_rank() is None  # the Ray executor reads it from its placement group
    assert _par(ep_node_ids=[3, 3, 1, 1]).node_of_rank() == (3, 3, 1, 1)
    assert node_numbers(["b7", "a1", "b7", "c2"]) == (0, 1, 0, 2)


@pytest.mark.parametrize("kw,match", [
    (dict(ep_nvlink_domain_size=0), r"ep_nvlink_domain_size=0 is invalid: must be a positive integer"),
    (dict(ep_nvlink_domain_size=-8), r"ep_nvlink_domain_size=-8 is invalid: must be a positive integer"),
    (dict(ep_nvlink_domain_size=True), r"ep_nvlink_domain_size=True is invalid: must be a positive integer"),
    (dict(ep_nvlink_domain_size=3), r"ep_nvlink_domain_size=3 is invalid for expert_parallel_size=4: .*must divide 4"),
    (dict(ep_node_ids=[0, 0, 1]), r"ep_node_ids must have one entry per rank \(4\), got 3"),
    (dict(ep_node_ids=[0, 0, -1, 1]), r"ep_node_ids\[2\]=-1 is invalid: node numbers must be integers >= 0"),
    (dict(ep_node_ids=[0, 0, 1, 1], ep_nvlink_domain_size=2), r"both set: give one node map"),
    (dict(ep_nvlink_domain_size=2, all_to_all="torch"), r"ep_nvlink_domain_size is set but all_to_all='torch'"),
    (dict(ep_node_ids=[0, 0, 1, 1], all_to_all="auto"), r"ep_node_ids is set but all_to_all='auto'"),
])
def test_bad_node_map_input(kw, match):
    with pytest.raises(ValueError, match=match):
        _par(**kw)


def test_cli_flag_reaches_the_config():
    from moelink.engine.api.cli_args import add_engine_args, engine_args_from

    p = argparse.ArgumentParser()
    add_engine_args(p)
    ns = p.parse_args(["m", "-ep", "4", "--all-to-all", "two_level", "--ep-nvlink-domain-size", "2"])
    assert engine_args_from(ns).parallel_config().node_of_rank() == (0, 0, 1, 1)
    with pytest.raises(ValueError, match=r"ep_nvlink_domain_size=3 is invalid for expert_parallel_size=4"):
        engine_args_from(p.parse_args(["m", "-ep", "4", "--all-to-all", "two_level",
                                       "--ep-nvlink-domain-size", "3"])).parallel_config()


def test_plan_carries_and_checks_the_node_map(tiny_model):
    from moelink.engine import EngineArgs

    config = EngineArgs(model=tiny_model("qwen3_e6k3"), dtype="float32", num_kv_blocks=32, expert_parallel_size=4,
                        all_to_all="two_level", ep_nvlink_domain_size=2).create_engine_config()
    plan = plan_expert_parallel(config)
    assert plan.backend is BACKENDS["two_level"] and plan.node_of_rank == (0, 0, 1, 1)
    placement = ExpertPlacement(num_experts=6, ep_size=4)
    with pytest.raises(ValueError, match=r"node_of_rank must be None for backend 'torch'"):
        ExpertParallelPlan(placement, BACKENDS["torch"], node_of_rank=(0, 0, 1, 1))
    with pytest.raises(ValueError, match=r"ExpertParallelPlan.node_of_rank must have one entry per rank \(4\)"):
        ExpertParallelPlan(placement, BACKENDS["two_level"], node_of_rank=(0, 1))
    with pytest.raises(ValueError, match=r"needs the node of each rank: the Ray executor reads it"):
        ExpertParallelPlan(placement, BACKENDS["two_level"]).for_rank(object(), 0, torch.device("cpu"))
    a2a = ExpertParallelPlan(placement, BACKENDS["two_level"], node_of_rank=[0, 1, 0, 1]).for_rank(
        object(), 1, torch.device("cpu")).all_to_all
    assert isinstance(a2a, TwoLevelAllToAll) and a2a.node_of_rank == (0, 1, 0, 1) and a2a.num_nodes == 2


def test_network_counters_add_up_from_layer_to_engine():
    stats = MoEStats(2, 4, torch.device("cpu"))
    assert stats.snapshot().bytes_inter_node == 0  # one-level backends record nothing here
    stats.record_inter_node(torch.tensor([0, 0, 3, 0]), row_bytes=64)
    stats.record_inter_node(torch.tensor([0, 2, 0, 1]), row_bytes=64)
    snap = stats.snapshot()
    assert (snap.inter_node_rows, snap.bytes_inter_node) == (6, 6 * 64)
    assert stats.snapshot().inter_node_rows == 0  # reset by the snapshot
    metrics = MoEMetrics(2, 4, world_size=2)
    other = MoECounters(np.zeros((2, 4), dtype=np.int64), inter_node_rows=1, bytes_inter_node=64)
    metrics.add_step([snap, other])
    metrics.add_step([None, other])
    assert (metrics.inter_node_rows, metrics.bytes_inter_node, metrics.last_step_bytes_inter_node) == (8, 8 * 64, 64)
