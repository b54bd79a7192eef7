"""The step's plug-in seam (engine/contract/step_plugin.py; ARCHITECTURE.md, "The step and its plug-ins"): a feature
joins a rank's step through its `FEATURE` alone, the runner calls a plug-in only at the points it overrides, and a
feature left off is not in the list at all."""
from __future__ import annotations

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.cluster import step_features
from moelink.engine.contract.host_copy import to_host
from moelink.engine.contract.step_plugin import (DeviceStep, RankModel, SampledRows, StepBatch, StepPlugin,
                                                 StepWork)


class _Recorded(StepWork[torch.Tensor]):
    """One step of the toy feature: each point it reaches, in order, and a payload from the forward's hidden
    states (the rows' norms) that travels back to the host with the step's results."""

    def __init__(self, plugin: "_Probe", num_tokens: int):
        self.plugin, self.num_tokens = plugin, num_tokens
        self.points: list[str] = []

    def plan_rows(self, rows: SampledRows) -> None:
        self.points.append("plan_rows")

    def before_forward(self, dev: DeviceStep) -> None:
        self.points.append("before_forward")

    def after_forward(self, dev: DeviceStep, h_TD: torch.Tensor) -> torch.Tensor:
        self.points.append("after_forward")
        return to_host(h_TD.float().norm(dim=-1))

    def after_sampling(self, dev: DeviceStep, h_TD: torch.Tensor) -> None:
        assert dev.sampled_R is not None, "a step that samples has its sampled ids on the device by now"
        self.points.append("after_sampling")

    def after_step(self, dev: DeviceStep) -> None:
        self.points.append("after_step")

    def collect(self, payload: torch.Tensor | None, out) -> None:
        self.points.append("collect")
        assert payload is not None and payload.shape == (self.num_tokens,) and payload.device.type == "cpu"
        self.plugin.steps.append((self.points, len(out.sampled_token_ids)))


class _Probe(StepPlugin):
    name = "probe"

    def __init__(self) -> None:
        self.steps: list[tuple[list[str], int]] = []
        self.held: set[str] = set()

    def admit(self, new, state) -> None:
        self.held.add(new.req_id)

    def release(self, req_id: str, preempted: bool) -> None:
        self.held.discard(req_id)

    def plan(self, batch: StepBatch) -> StepWork | None:
        assert {st.req_id for st in batch.states} <= self.held, "a step holds only admitted requests"
        return _Recorded(self, batch.num_tokens)


class _ProbeFeature:
    name = _Probe.name
    made: list[_Probe] = []

    def make(self, rank: RankModel, config) -> StepPlugin | None:
        probe = _Probe()
        self.made.append(probe)
        return probe


def test_a_new_feature_joins_the_step_by_its_registration_line_alone(tiny_model, monkeypatch):
    """The toy feature is one class and one entry in the cluster's list: every rank makes its plug-in, each step
    reaches its points in order (device work between the host's), and its payload comes back at collect."""
    feature = _ProbeFeature()
    monkeypatch.setattr(step_features, "STEP_FEATURES", (*step_features.STEP_FEATURES, feature))
    llm = LLM(tiny_model("qwen3_e6k3"), dtype="float32", num_kv_blocks=32)
    try:
        out = llm.generate(["hello there", "a b c d"], SamplingParams(max_tokens=3, temperature=0.0))
        assert all(len(o.outputs[0].token_ids) == 3 for o in out)
    finally:
        llm.shutdown()
    probe = feature.made[-1]
    assert probe.steps, "the probe ran in no step"
    order = ["plan_rows", "before_forward", "after_forward", "after_sampling", "after_step", "collect"]
    assert all(points == order for points, _ in probe.steps), probe.steps
    assert sum(n for _, n in probe.steps) == 6  # 3 tokens for each of the 2 requests, as the probe saw them
    assert probe.held == set(), "every request left the rank's plug-ins when it finished"


def test_features_left_off_are_not_in_the_step(tiny_model):
    """A plain engine's rank holds only the always-on per-request features, and each point calls only the plug-ins
    that act there: no LoRA, images, KV connector or drafter is asked anything."""
    llm = LLM(tiny_model("qwen3_e6k3"), dtype="float32", num_kv_blocks=32)
    try:
        runner = llm.engine.executor.worker.runner
        assert [p.name for p in runner.plugins] == ["routing_replay", "prompt_logprobs", "grammar"]
        assert all(runner.plugin(name) is None for name in ("lora", "images", "kv_transfer", "speculative"))
        assert runner.step_plugins.before_step == () and runner.step_plugins.idle_planners == ()
        assert runner.step_plugins.collectors == ()
        assert runner.step_plugins._admit == () and runner.step_plugins._planners == ()  # woken by requests only
    finally:
        llm.shutdown()


def test_a_per_request_feature_wakes_for_the_requests_that_ask_and_sleeps_after(tiny_model, monkeypatch):
    """Prompt logprobs plan steps only while the rank holds a request that asked: a plain request's steps never
    call the plug-in, an asking request's do, and none once it finished."""
    from moelink.engine.prompt_logprobs.plugin import PromptLogprobsPlugin

    calls: list[int] = []
    plan = PromptLogprobsPlugin.plan

    def counted(self, batch):
        calls.append(len(batch.states))
        return plan(self, batch)

    monkeypatch.setattr(PromptLogprobsPlugin, "plan", counted)
    llm = LLM(tiny_model("qwen3_e6k3"), dtype="float32", num_kv_blocks=32)
    try:
        llm.generate(["hello there"], SamplingParams(max_tokens=3, temperature=0.0))
        assert calls == []
        out = llm.generate(["hello there"], SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=1))
        assert out[0].prompt_logprobs and calls, "the asking request's steps planned its scoring"
        asked = len(calls)
        llm.generate(["hello there"], SamplingParams(max_tokens=3, temperature=0.0))
        assert len(calls) == asked, "asleep again once the asking request left the rank"
    finally:
        llm.shutdown()


def test_two_plugins_of_one_feature_are_refused(tiny_model, monkeypatch):
    monkeypatch.setattr(step_features, "STEP_FEATURES", (*step_features.STEP_FEATURES, _ProbeFeature(),
                                                         _ProbeFeature()))
    with pytest.raises(ValueError, match="name one feature twice"):
        LLM(tiny_model("qwen3_e6k3"), dtype="float32", num_kv_blocks=32)
