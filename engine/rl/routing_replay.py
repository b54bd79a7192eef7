"""Rollout routing replay on a rank (SamplingParams.forced_routed_experts; moe/routing_replay.py): the given expert
ids of a step's rows, as one [L, T, K] tensor for the MoE layers.

Legend: T the step's tokens, L MoE layers, K top-k, n the positions a request gives.

A request gives ids for its first n prompt positions ([n, L, K], n <= its prompt; a row of -1: its router's
choice). A step's rows are positions of their requests: row i of request s is position num_computed_tokens + i, so
a chunked prefill takes the rows its chunk covers, and a recompute after a preemption takes them again. Positions
past n (later prompt tokens, generated ones) route on their own.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, cast

import numpy as np
import torch

from ..contract.step_plugin import DeviceStep, HeldRequest, RankModel, StepBatch, StepPlugin, StepWork

if TYPE_CHECKING:
    from moelink.scheduler.outputs import NewRequestData

    from moelink.moe.routing_replay import RoutingReplay

    from ..config.worker_config import WorkerConfig


class ReplayingModel(Protocol):
    """The decoder's calls a replay makes (engine/models/moe_decoder.py)."""

    def routing_replay(self) -> RoutingReplay: ...

    def begin_routing_replay(self, forced_LTK: torch.Tensor | None) -> None: ...


def plan(states: list, query_lens: list[int], qsl_S1: np.ndarray, num_layers: int, top_k: int
         ) -> np.ndarray | None:
    """int32 [T, L, K] of the step (before num_computed_tokens moves on), -1 where nothing is given; None when no
    row of the step is given."""
    forced = None
    for s, (st, n) in enumerate(zip(states, query_lens)):
        given = getattr(st.params, "forced_routed_experts", None)
        if given is None or n == 0 or st.num_computed_tokens >= len(given):
            continue
        if forced is None:
            forced = np.full((int(qsl_S1[-1]), num_layers, top_k), -1, dtype=np.int32)
        first = st.num_computed_tokens
        stop = min(first + n, len(given))
        row = int(qsl_S1[s])
        forced[row: row + stop - first] = given[first:stop]
    return forced


def to_device(forced_TLK: np.ndarray, device: torch.device) -> torch.Tensor:
    """[L, T, K] int32 on the device, each layer's rows contiguous (the layers take theirs in turn)."""
    return torch.from_numpy(np.ascontiguousarray(forced_TLK.transpose(1, 0, 2))).to(device, non_blocking=True)


class _Forced(StepWork[None]):
    """A step with given routing: the MoE layers take it for this forward only (a graph does not replay it; under
    EP with graphs the engine refuses it)."""

    graphable = False

    def __init__(self, model: ReplayingModel, forced_TLK: np.ndarray):
        self.model, self.forced_TLK = model, forced_TLK

    def before_forward(self, dev: DeviceStep) -> None:
        self.model.begin_routing_replay(to_device(self.forced_TLK, dev.device))

    def after_forward(self, dev: DeviceStep, h_TD: torch.Tensor) -> None:
        self.model.begin_routing_replay(None)  # later forwards (other steps, warm-up) route on their own


class RoutingReplayPlugin(StepPlugin):
    """The step plug-in: it hears of the requests that give their routing alone (`wakes_on`), and a step plans the
    given rows only while the rank holds some."""

    name = "routing_replay"
    wakes_on = "forced_routed_experts"

    def __init__(self, model: ReplayingModel, top_k: int):
        self.model, self.top_k = model, top_k

    def admit(self, new: NewRequestData, state: HeldRequest) -> None:
        self.model.routing_replay()  # made on first use (ValueError for a model that cannot replay)

    def plan(self, batch: StepBatch) -> StepWork | None:
        forced = plan(list(batch.states), batch.query_lens, batch.qsl_S1, self.model.routing_replay().num_layers,
                      self.top_k)
        return _Forced(self.model, forced) if forced is not None else None


class RoutingReplayFeature:
    """Every engine takes given routing from the requests that carry it (the engine checks them against the model:
    engine/core/input_processing.py)."""

    name = RoutingReplayPlugin.name

    def make(self, rank: RankModel, config: WorkerConfig) -> StepPlugin | None:
        return RoutingReplayPlugin(cast(ReplayingModel, rank.model), rank.cfg.top_k)


FEATURE = RoutingReplayFeature()
