"""Rollout routing replay on a rank (`--enable-return-routed-experts`, SamplingParams.return_routed_experts): which
rows of a step belong to the requests that asked, and their routed expert ids (moe/routing_capture.py) back to the
host with the step's other results.

Legend: P rows of asking requests this step, L MoE layers, K top-k.

Every row a step forwards is a position of its request (prompt tokens, generated tokens fed back, a verify step's
drafts); the scheduler keeps each request's rows by position (a later step's rows for the same positions, after a
preemption or rejected drafts, replace them) and the output carries positions 0 .. prompt + generated - 2, the
positions the model forwarded. Such a request computes its whole prompt (no prefix-cache or KV-load hit: the
routing of KV it did not compute is not kept), as a prompt-logprobs request does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np
import torch

from moelink.scheduler.outputs import RoutedExperts

from ..contract.host_copy import to_host
from ..contract.step_plugin import DeviceStep, HeldRequest, RankModel, StepBatch, StepPlugin, StepWork

if TYPE_CHECKING:
    from moelink.moe.routing_capture import RoutingCapture
    from moelink.scheduler.outputs import ModelRunnerOutput, NewRequestData

    from ..config.worker_config import WorkerConfig


class _Capturing(Protocol):
    def enable_routing_capture(self) -> RoutingCapture: ...


@dataclass
class RoutedExpertsPlan:
    rows_P: np.ndarray  # int64 [P]: rows of the step's flat batch
    requests: list[tuple[str, int, int]]  # (request id, position of its first row, rows): in row order


def plan(states: list, query_lens: list[int], qsl_S1: np.ndarray) -> RoutedExpertsPlan | None:
    """The rows of the requests that asked (before num_computed_tokens moves on); None when none did."""
    rows, requests = [], []
    for s, (st, n) in enumerate(zip(states, query_lens)):
        if not st.params.return_routed_experts or n == 0:
            continue
        rows.append(np.arange(int(qsl_S1[s]), int(qsl_S1[s]) + n, dtype=np.int64))
        requests.append((st.req_id, st.num_computed_tokens, n))
    if not requests:
        return None
    return RoutedExpertsPlan(np.concatenate(rows), requests)


def gather(capture, p: RoutedExpertsPlan, device: torch.device) -> torch.Tensor:
    """int32 [P, L, K] on the device: the plan's rows of the step's capture."""
    return capture.rows(torch.from_numpy(p.rows_P).to(device, non_blocking=True))


def unpack(p: RoutedExpertsPlan, ids_PLK: torch.Tensor) -> dict[str, RoutedExperts]:
    """The host side: {request id: its rows} (ids_PLK already in host memory)."""
    arr = ids_PLK.numpy()
    out, i = {}, 0
    for req_id, first, n in p.requests:
        out[req_id] = RoutedExperts(first, arr[i: i + n].astype(np.int16 if arr.max(initial=0) < 2 ** 15 else np.int32))
        i += n
    return out


class _Gather(StepWork[torch.Tensor]):
    """Every step of an engine that records routing: an eager forward writes its rows from 0 (a replayed graph
    does so itself); the rows of the requests that asked, when some did (`plan`), back to the host."""

    def __init__(self, capture: RoutingCapture, plan: RoutedExpertsPlan | None):
        self.capture, self.plan = capture, plan

    def before_forward(self, dev: DeviceStep) -> None:
        if not dev.replay:
            self.capture.begin_step()

    def after_forward(self, dev: DeviceStep, h_TD: torch.Tensor) -> torch.Tensor | None:
        return to_host(gather(self.capture, self.plan, dev.device)) if self.plan is not None else None

    def collect(self, payload: torch.Tensor | None, out: ModelRunnerOutput) -> None:
        if self.plan is not None and payload is not None:
            out.routed_experts = unpack(self.plan, payload)


class RoutedExpertsPlugin(StepPlugin):
    """The step plug-in: the requests held that asked, their rows of each step's capture back to the host."""

    name = "routed_experts"

    def __init__(self, capture: RoutingCapture):
        self.capture = capture
        self._ids: set[str] = set()

    def admit(self, new: NewRequestData, state: HeldRequest) -> None:
        if new.sampling_params.return_routed_experts:
            self._ids.add(new.req_id)

    def release(self, req_id: str, preempted: bool) -> None:
        self._ids.discard(req_id)

    def reset(self) -> None:
        self._ids = set()

    def plan(self, batch: StepBatch) -> StepWork | None:
        return _Gather(self.capture, plan(list(batch.states), batch.query_lens, batch.qsl_S1) if self._ids else None)


class RoutedExpertsFeature:
    """On with `--enable-return-routed-experts` (WorkerConfig.return_routed_experts): the capture is enabled when the
    plug-in is made, before warm-up and graph capture, so that the largest step sizes its buffer and the graphs
    replay its copies."""

    name = RoutedExpertsPlugin.name

    def make(self, rank: RankModel, config: WorkerConfig) -> StepPlugin | None:
        if not config.return_routed_experts:
            return None
        return RoutedExpertsPlugin(cast(_Capturing, rank.model).enable_routing_capture())


FEATURE = RoutedExpertsFeature()
