"""The driver's per-step EP plan (engine/contract/ep_step.py), --ep-decode-capacity, and the two modes in one engine.

The engine runs here at world size 1 with the fixed-capacity "torch_padded" backend: the real two-mode path
(step plan → begin_step → padded dispatch → combine, device counters) in one process; multi-rank runs are in
tests/ep/test_ep_modes_ray.py and tests/comm/test_ep_modes.py.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from moelink.engine import LLM, EngineArgs, SamplingParams
from moelink.engine.contract.ep_step import HIGH_THROUGHPUT, LOW_LATENCY, EPStepPlan, plan_ep_step
from moelink.engine.contract.expert_parallel import plan_expert_parallel
from moelink.scheduler.outputs import SchedulerOutput

from tests.helpers.host_syncs import HostSyncCounter, count_moe_layer_syncs


def _so(*tokens: int) -> SchedulerOutput:
    sched = {f"r{i}": n for i, n in enumerate(tokens)}
    return SchedulerOutput(step_id=0, num_scheduled_tokens=sched, total_num_scheduled_tokens=sum(tokens))


# -- the rule ------------------------------------------------------------------------------------------------
def test_decode_steps_run_low_latency_with_the_graph_size_of_the_largest_rank():
    # Ranks decode 3, 0 and 5 sequences: low-latency, and every rank replays the size-8 graph (5 -> 8).
    plan = plan_ep_step([_so(1, 1, 1), _so(), _so(1, 1, 1, 1, 1)], decode_capacity=8, graph_sizes=(1, 2, 4, 8))
    assert plan == EPStepPlan(LOW_LATENCY, 5, 8)
    assert plan_ep_step([_so(1, 1, 1, 1, 1)], 8, graph_sizes=(1, 2, 4)).graph_batch is None  # above the graphs
    assert plan_ep_step([_so(1), _so(1)], 8).graph_batch is None  # no graphs captured


def test_prefill_and_mixed_steps_run_high_throughput_at_the_largest_rank():
    assert plan_ep_step([_so(1, 1), _so(7, 1)], decode_capacity=64) == EPStepPlan(HIGH_THROUGHPUT, 8)
    assert plan_ep_step([_so(30), _so()], decode_capacity=64, graph_sizes=(1, 2)) == EPStepPlan(HIGH_THROUGHPUT, 30)


def test_a_decode_step_past_the_capacity_falls_back_to_high_throughput():
    # Rank 1 decodes 5 sequences, above the decode capacity 4: the whole step runs high-throughput.
    plan = plan_ep_step([_so(1, 1), _so(1, 1, 1, 1, 1)], decode_capacity=4, graph_sizes=(1, 2, 4))
    assert plan == EPStepPlan(HIGH_THROUGHPUT, 5)
    assert plan_ep_step([_so(1, 1), _so(1, 1, 1, 1)], decode_capacity=4).mode == LOW_LATENCY  # exactly at it


@pytest.mark.parametrize("kw, match", [
    (dict(mode=LOW_LATENCY, max_tokens_per_rank=-1), "max_tokens_per_rank=-1 is invalid"),
    (dict(mode=HIGH_THROUGHPUT, max_tokens_per_rank=4, graph_batch=4), "graph_batch=4 is invalid"),
    (dict(mode=LOW_LATENCY, max_tokens_per_rank=5, graph_batch=4), "graph_batch=4 is invalid"),
])
def test_bad_plans_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        EPStepPlan(**kw)


# -- the flag ------------------------------------------------------------------------------------------------
def test_decode_capacity_defaults_to_max_num_seqs_and_is_validated(tiny_model):
    path = tiny_model("qwen3_e6k3")
    cfg = EngineArgs(model=path, device="cpu", all_to_all="torch_padded", max_num_seqs=6,
                     max_num_batched_tokens=64).create_engine_config()
    plan = plan_expert_parallel(cfg)
    assert (plan.max_tokens_per_rank, plan.decode_capacity) == (64, 6)
    cfg = EngineArgs(model=path, device="cpu", all_to_all="torch_padded", ep_decode_capacity=3,
                     max_num_batched_tokens=64).create_engine_config()
    assert plan_expert_parallel(cfg).decode_capacity == 3
    # The counted backends size every call themselves: no decode capacity, no step plan.
    assert plan_expert_parallel(EngineArgs(model=path, device="cpu").create_engine_config()).decode_capacity is None
    for bad in (0, -2, True, 2.5):
        with pytest.raises(ValueError, match=f"ep_decode_capacity={bad!r} is invalid"):
            EngineArgs(model=path, device="cpu", ep_decode_capacity=bad).create_engine_config()
    with pytest.raises(ValueError, match="ep_decode_capacity=100 is invalid: above max_num_batched_tokens=64"):
        plan_expert_parallel(EngineArgs(model=path, device="cpu", all_to_all="torch_padded", ep_decode_capacity=100,
                                        max_num_batched_tokens=64).create_engine_config())


def test_cli_flag_reaches_engine_args():
    from moelink.engine.api.cli import build_parser, engine_args_from

    ns = build_parser().parse_args(["generate", "m", "--prompt", "x", "--ep-decode-capacity", "32"])
    assert engine_args_from(ns).ep_decode_capacity == 32
    ns = build_parser().parse_args(["generate", "m", "--prompt", "x"])
    assert engine_args_from(ns).ep_decode_capacity is None


# -- one engine, both modes ----------------------------------------------------------------------------------
KW = dict(dtype="float64", device="cpu", max_num_seqs=6, max_num_batched_tokens=48, num_kv_blocks=96, block_size=16)
PROMPTS = [[5, 9, 13, 2, 7, 11, 3], [4, 8], [21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38],
           [6], [40, 41, 42, 43, 44], [50, 51, 52]]


def _greedy(llm):
    # Outputs of 2..10 tokens: the decode batch shrinks 6 -> 1 as requests finish.
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (2, 10, 3, 8, 4, 6)]
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.mark.parametrize("name", ["qwen3_e6k3", "mixtral_e5k3"])
@pytest.mark.parametrize("decode_capacity", [None, 4])  # 4 < 6 decoding sequences: those steps fall back
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_two_mode_engine_matches_the_engine_without_dispatch(tiny_model, name, decode_capacity):
    path = tiny_model(name)
    want = _greedy(LLM(path, **KW))
    llm = LLM(path, all_to_all="torch_padded", ep_decode_capacity=decode_capacity, **KW)
    assert _greedy(llm) == want
    m = llm.engine.moe_metrics
    modes = m.per_mode
    # All six prompts (36 tokens) fit the first step's budget: one high-throughput prefill step, then decode
    # steps, low-latency unless more than `decode_capacity` sequences decode (the fallback, still exact).
    assert modes[LOW_LATENCY]["steps"] > 0
    assert modes[HIGH_THROUGHPUT]["steps"] == 1 if decode_capacity is None else modes[HIGH_THROUGHPUT]["steps"] > 1
    # Payload rows are one per token at world size 1; the wire carries whole blocks.
    assert m.tokens_dispatched == m.total_routed() // 3  # top-3: one row per token and MoE layer
    ll = modes[LOW_LATENCY]
    assert ll["wire_rows"] == ll["steps"] * 2 * (decode_capacity or 6)  # two MoE layers, one block of C rows
    assert ll["rows"] <= ll["wire_rows"] and m.wire_rows == sum(v["wire_rows"] for v in modes.values())


def test_a_low_latency_step_makes_no_host_sync_in_its_moe_layers(tiny_model):
    # The serial loop: exactly one forward per `step()`, in this thread. Under the overlapped loop a step's
    # forward may still be in flight when the layers are wrapped (CI once counted the second layer of a step
    # launched before the wrap, on the stream thread CPU ranks had then); the MoE layers' code is the same.
    llm = LLM(tiny_model("qwen3_e6k3"), all_to_all="torch_padded", async_scheduling=False, **KW)
    llm.generate(PROMPTS[:3], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    engine = llm.engine
    engine.add_request("decode-me", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    engine.step()  # the prompt: high-throughput
    runner = engine.executor.worker.runner
    with HostSyncCounter() as counter:
        per_layer = count_moe_layer_syncs(runner.model, counter)
        engine.step()  # one decode step
    assert runner.ep.all_to_all.mode.name == LOW_LATENCY
    assert per_layer == [0, 0], counter.where


def test_metrics_export_bytes_per_mode(tiny_model):
    from moelink.engine.core.metrics import _EngineCollector

    llm = LLM(tiny_model("qwen3_e6k3"), all_to_all="torch_padded", **KW)
    llm.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    per_mode = llm.engine.moe_metrics.per_mode
    families = {f.name: f for f in _EngineCollector(SimpleNamespace(engine=llm.engine, tokens_per_second=lambda: 0.0))
                ._moe(llm.engine)}
    samples = {tuple(s.labels.values()): s.value for s in families["moelink_all_to_all_mode_bytes"].samples}
    for mode in (LOW_LATENCY, HIGH_THROUGHPUT):
        assert samples[(mode, "payload")] == per_mode[mode]["bytes"] > 0
        assert samples[(mode, "wire")] == per_mode[mode]["wire_bytes"] >= per_mode[mode]["bytes"]


def test_the_plan_is_what_the_scheduler_output_names():
    """SchedulerOutput.ep_step is typed by the scheduler's EPStep shape: EPStepPlan has each of its fields."""
    import dataclasses

    from moelink.scheduler.outputs import EPStep

    shape = {n for n, v in vars(EPStep).items() if isinstance(v, property)}
    assert shape == {"mode", "max_tokens_per_rank", "graph_batch"}
    assert shape <= {f.name for f in dataclasses.fields(EPStepPlan)}


def test_verify_steps_run_low_latency_without_a_shared_graph_size():
    """A request verifying its drafts schedules its last token and the drafts (1 + k tokens): such steps run
    low-latency within the capacity, each rank replaying its own verify graph (no shared decode graph size)."""
    def verify(*drafts: int) -> SchedulerOutput:
        so = _so(*(1 + k for k in drafts))
        so.scheduled_spec_tokens = {f"r{i}": [7] * k for i, k in enumerate(drafts) if k}
        return so

    assert plan_ep_step([verify(2, 2), _so(1)], 8, graph_sizes=(1, 2, 4)) == EPStepPlan(LOW_LATENCY, 6, None)
    assert plan_ep_step([verify(2, 0), _so()], 8, graph_sizes=(1, 2)) == EPStepPlan(LOW_LATENCY, 4, None)
    assert plan_ep_step([verify(2, 2, 2), _so(1)], 8) == EPStepPlan(HIGH_THROUGHPUT, 9)  # past the capacity
    assert plan_ep_step([_so(3), _so(1)], 8) == EPStepPlan(HIGH_THROUGHPUT, 3)  # a 3-token chunk is no verify
    assert plan_ep_step([_so(1, 1), _so(1)], 8, graph_sizes=(1, 2)) == EPStepPlan(LOW_LATENCY, 2, 2)
