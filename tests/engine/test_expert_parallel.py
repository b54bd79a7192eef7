"""The expert-parallel plan: built once from the engine config, the same object on the workers and in the
expert-load report, with the capacity rule and the backend resolved in one place."""
from __future__ import annotations

import pickle

import pytest
import torch

from moelink.comm.all_to_all import NoAllToAll
from moelink.comm.backends import BACKENDS
from moelink.engine import EngineArgs
from moelink.engine.contract.expert_parallel import ExpertParallelPlan, plan_expert_parallel
from moelink.moe.placement import ExpertPlacement


def _config(tiny_model, **kw):
    return EngineArgs(model=tiny_model("qwen3_e6k3"), dtype="float32", num_kv_blocks=32, **kw).create_engine_config()


def test_plan_from_config(tiny_model):
    plan = plan_expert_parallel(_config(tiny_model, expert_parallel_size=2, num_redundant_experts=2))
    assert plan.placement == ExpertPlacement(num_experts=6, ep_size=2, num_redundant=2)
    assert plan.world_size == 2 and plan.backend is BACKENDS["torch"] and plan.max_tokens_per_rank is None
    # Fixed-capacity backends: one step's token budget per rank.
    plan = plan_expert_parallel(_config(tiny_model, expert_parallel_size=2, all_to_all="torch_padded",
                                        max_num_batched_tokens=48))
    assert plan.backend is BACKENDS["torch_padded"] and plan.max_tokens_per_rank == 48
    # Ray ships the plan to every rank.
    assert pickle.loads(pickle.dumps(plan)) == plan


def test_one_rank_holds_every_expert_once(tiny_model):
    # num_redundant_experts has nowhere to go on one rank (never two copies of an expert on a rank).
    plan = plan_expert_parallel(_config(tiny_model, num_redundant_experts=2))
    assert plan.placement == ExpertPlacement(num_experts=6, ep_size=1) and plan.backend is BACKENDS["none"]
    ep = plan.for_rank(None, 0, torch.device("cpu"))
    assert isinstance(ep.all_to_all, NoAllToAll) and ep.local_experts == list(range(6))
    assert ep.tables.ep_size == 1 and ep.tables.replica_slot_GX[:, 0].tolist() == list(range(6))


def test_plan_validation_names_the_field():
    placement = ExpertPlacement(num_experts=4, ep_size=2)
    with pytest.raises(ValueError, match=r"max_tokens_per_rank must be a positive integer for backend 'nccl'"):
        ExpertParallelPlan(placement, BACKENDS["nccl"])
    with pytest.raises(ValueError, match=r"max_tokens_per_rank must be None for backend 'torch'"):
        ExpertParallelPlan(placement, BACKENDS["torch"], 8)
    with pytest.raises(ValueError, match=r"backend 'none' runs at world size <= 1.*ep_size=2"):
        ExpertParallelPlan(placement, BACKENDS["none"])
    with pytest.raises(ValueError, match=r"placement must be an ExpertPlacement"):
        ExpertParallelPlan("contiguous", BACKENDS["torch"])


def test_engine_workers_and_report_share_one_plan(tiny_model):
    from moelink.engine import LLM

    with LLM(tiny_model("qwen3_e6k3"), dtype="float32", num_kv_blocks=32, max_model_len=128) as llm:
        engine = llm.engine
        assert engine.executor.plan is engine.ep_plan and engine.executor.worker.plan is engine.ep_plan
        assert engine.expert_load().experts_on_ranks == (tuple(range(6)),)
        assert engine.experts_on_ranks() == [[(e, 1) for e in range(6)]]
