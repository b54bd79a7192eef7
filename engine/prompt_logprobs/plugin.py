"""The prompt-logprobs step plug-in: the requests held that asked (a step plans their scoring only while there are
some), their positions scored from the forward's hidden states before sampling (which may not run), the packed
rows back with the step's other results."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..contract.host_copy import to_host
from ..contract.step_plugin import DeviceStep, RankModel, StepBatch, StepPlugin, StepWork
from . import scoring

if TYPE_CHECKING:
    from moelink.scheduler.outputs import ModelRunnerOutput

    from ..config.worker_config import WorkerConfig


class _Scoring(StepWork[torch.Tensor]):
    def __init__(self, plan: scoring.PromptLogprobsPlan):
        self.plan = plan

    def after_forward(self, dev: DeviceStep, h_TD: torch.Tensor) -> torch.Tensor:
        return to_host(scoring.score(dev.model, h_TD, self.plan))

    def collect(self, payload: torch.Tensor | None, out: ModelRunnerOutput) -> None:
        assert payload is not None, "a scored step hands its rows back"
        out.prompt_logprobs = scoring.unpack(self.plan, payload)


class PromptLogprobsPlugin(StepPlugin):
    """Planned only while the rank holds a request that asked (`wakes_on`); its prompt positions scored until the
    prompt is computed."""

    name = "prompt_logprobs"
    wakes_on = "prompt_logprobs"

    def plan(self, batch: StepBatch) -> StepWork | None:
        p = scoring.plan(list(batch.states), batch.query_lens, batch.qsl_S1)
        return _Scoring(p) if p is not None else None


class PromptLogprobsFeature:
    """Every engine scores prompts for the requests that ask (the engine checks the field)."""

    name = PromptLogprobsPlugin.name

    def make(self, rank: RankModel, config: WorkerConfig) -> StepPlugin | None:
        return PromptLogprobsPlugin()


FEATURE = PromptLogprobsFeature()
