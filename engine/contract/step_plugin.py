"""The step's plug-in seam: what a feature may do at each point of a rank's model step, and nothing else.

A rank's step (engine/rank/model_runner.py) is the same for every model and every configuration: update the held
requests, build the flat batch, run the forward (eagerly or as a replayed CUDA graph), sample, hand the outputs back.
A feature (LoRA, images, prompt logprobs, routed experts, routing replay, KV transfer, ...) joins it as a
`StepPlugin`, made for the rank by its `StepFeature` when the engine's configuration turns it on, and handed to the
runner in a list by the cluster (engine/rank/worker.py, from the registry engine/rank/step_features.py). A feature
not configured is not in the list: it costs no call and no per-sequence check in any step.

The points of a step, in order (host: the engine thread that launches the step; device: the thread that runs its
device work, in stream order, engine/rank/device_stream.py):

  host    `before_step(so)`      the scheduler's step, before the held requests change (LoRA: adapters to read ahead)
  host    `admit` / `release`    a request joins the rank / leaves it (finished, preempted); `reset`: hold none
  host    `plan(batch)`          the step's rows, before their computed counts move on -> a `StepWork` or None
  host    `StepWork.plan_rows(rows)`   the step's inputs built and its sampling rows picked (a drafter's plan)
  host    `StepWork.sampling(ctx)`     a work may take over the sampling rows' sampling (a verify step)
  host    `plan_idle(so, runs)`  a step with no tokens of the rank's own (EP: its peers' MoE collectives)
  device  `StepWork.before_forward(dev)`   after the batch-state fills, before the inputs and the forward
  device  `StepWork.after_forward(dev, h_TD)` after the forward, before sampling -> a payload, in host memory
  device  `StepWork.after_sampling(dev, h_TD)` after sampling (a device drafter's drafts) -> a payload
  device  `StepWork.after_step(dev)`       the step's last device work, in reverse plug-in order (KV saves last)
  host    `StepWork.collect(payload, out)` when the step is collected: what it adds to the ModelRunnerOutput
  host    `collect(out)`          every collected step, planned or not (a connector's transfers that ended)

A `StepWork` may restrict what the step's rows sample (`token_masks`: structured output's grammars), says whether a
replayed decode graph may run its step (`graphable`), and may give the graph one per-token input (`graph_tokens_T`: LoRA's slots) that the captured forward reads from a static buffer; a plug-in
whose steps a graph can never run says so once (`allows_graphs`). Payloads cross threads as the step's other
results do: tensors copied to host memory in stream order (engine/contract/host_copy.py), read after the one wait.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Generic, Protocol, Sequence, TypedDict, TypeVar

import numpy as np
import torch

from .forward_inputs import ImageSplice
from .spec_decoding import CapturedStates, DraftRequest, DraftStepInputs, SamplingBatch, VerifyStep

if TYPE_CHECKING:
    from moelink.scheduler.outputs import ModelRunnerOutput, NewRequestData, SchedulerOutput

    from moelink.kernels.attention import AttentionMetadata
    from moelink.kernels.ops import Kernels
    from moelink.moe.layer import ExpertParallel

    from ..config.model import ModelConfig
    from ..config.worker_config import WorkerConfig
    from ..tp.group import TensorParallel
    from .kv_blocks import PagedKVBlocks


class HeldRequest(Protocol):
    """What a plug-in reads of a request the rank holds (engine/rank/input_batch.CachedRequestState)."""

    req_id: str
    prompt_token_ids: list[int]
    num_computed_tokens: int


@dataclass
class SampledRows:
    """The host's view of a planned step once its inputs are built: the flat batch, its sequences and the ones
    that sample (in row order), the drafts each verifies."""

    inputs: DraftStepInputs
    states: Sequence[DraftRequest]
    picked: Sequence[DraftRequest]
    spec_tokens: dict[str, list[int]]


@dataclass
class SamplingContext:
    """What a step's sampling rows sample from (rows `rows_S[sample_rows]` of the runner's batch, each row's last
    token at `qsl_S1[1:][sample_rows] - 1`), for a plug-in that takes their sampling over (a verify step)."""

    batch: SamplingBatch
    rows_S: np.ndarray
    sample_rows: list[int]
    qsl_S1: np.ndarray
    picked: Sequence[DraftRequest]
    spec_tokens: dict[str, list[int]]
    eos_token_ids: set[int]
    device: torch.device
    token_masks: dict[str, bytes] | None
    num_pending: list[int]


@dataclass
class DeviceInputs:
    """The step's eager device inputs (engine/rank/step_inputs.device_inputs), for the work that reads them."""

    input_ids_T: torch.Tensor
    positions_T: torch.Tensor
    attn: AttentionMetadata


@dataclass
class StepBatch:
    """The host's view of a planned step: its sequences in batch order, each one's tokens this step, where each
    starts in the flat batch, before their computed counts move on."""

    so: SchedulerOutput
    states: Sequence[HeldRequest]
    query_lens: list[int]
    qsl_S1: np.ndarray  # int32 [S + 1]
    num_tokens: int


@dataclass
class DeviceStep:
    """What a step's device hooks see: the rank's model and device, and whether a captured graph replays the
    forward (its per-token inputs were staged with the graph's)."""

    model: torch.nn.Module  # the decoder (engine/models/moe_decoder.py); a feature names the calls it makes
    device: torch.device
    replay: bool
    run_forward: bool = True  # False: a rank with no tokens whose peers run none either (EP): transfers only
    inputs: DeviceInputs | None = None  # the eager inputs, built when a forward or a work reads them
    sampled_R: torch.Tensor | None = None  # long [R] each sampling row's (last) token, once sampled
    emitted_R: torch.Tensor | None = None  # long [R_verify] tokens each verifying row emitted (a verify step)
    idle: bool = False  # a step with no tokens of the rank's own (EP: its peers' MoE collectives)


class ForwardExtras(TypedDict, total=False):
    """What a step's plug-ins add to its forward's context (engine/models/layers.ForwardContext)."""

    images: ImageSplice  # the image rows to splice and the step's 3-D positions
    aux: CapturedStates | None  # the states the forward keeps for a drafter (EAGLE-3's)


Payload = TypeVar("Payload")


class StepWork(Generic[Payload]):
    """One plug-in's part of one step (planned on the host, run in the step's device work, collected on the host).
    Each hook has a default that does nothing; the runner calls only those a subclass overrides."""

    graphable: bool = True
    # int64 [T] per-token input a replayed graph reads from its static buffer (None: none, or an eager step).
    graph_tokens_T: np.ndarray | None = None
    # The tokens each request may sample this step, packed little-endian bits per request id (structured output);
    # None: this work restricts nothing.
    token_masks: dict[str, bytes] | None = None
    # The step's eager device inputs are built even when a graph replays it (a drafter reads them after).
    needs_inputs: bool = False

    def plan_rows(self, rows: SampledRows) -> None:
        return None

    def sampling(self, ctx: SamplingContext) -> VerifyStep | None:
        """A sampling of the step's sampling rows that replaces the sampler's (None: the sampler's)."""
        return None

    def before_forward(self, dev: DeviceStep) -> None:
        return None

    def forward_extras(self) -> ForwardExtras:
        """What this step adds to the forward's context (images: the rows to splice; a drafter: the states the
        forward keeps for it)."""
        return {}

    def after_forward(self, dev: DeviceStep, h_TD: torch.Tensor) -> Payload | None:
        """A payload for `collect`, in host memory once the step is waited for (None: nothing to collect)."""
        return None

    def after_sampling(self, dev: DeviceStep, h_TD: torch.Tensor) -> Payload | None:
        """A payload for `collect` (replacing after_forward's when not None)."""
        return None

    def after_step(self, dev: DeviceStep) -> None:
        return None

    def collect(self, payload: Payload | None, out: ModelRunnerOutput) -> None:
        return None


class StepPlugin:
    """One configured feature on one rank (the module docstring lists the points). Defaults do nothing; the runner
    builds, per point, the list of the plug-ins that override it."""

    name: ClassVar[str]
    # False: a decode graph can never run this feature's steps (images: 3-D positions a graph does not take).
    allows_graphs: bool = True
    # A SamplingParams field: the plug-in hears only of the requests that set it (not None, not False), and plans
    # a step only while the rank holds one (engine/rank/plugin_set.py). None: it hears of every request and plans
    # every step.
    wakes_on: ClassVar[str | None] = None

    def before_step(self, so: SchedulerOutput) -> None:
        return None

    def admit(self, new: NewRequestData, state: HeldRequest) -> None:
        return None

    def release(self, req_id: str, preempted: bool) -> None:
        return None

    def reset(self) -> None:
        return None

    def plan(self, batch: StepBatch) -> StepWork | None:
        return None

    def plan_idle(self, so: SchedulerOutput, runs: bool) -> StepWork | None:
        """`runs`: the idle step runs device work anyway (the MoE collectives, batch-state fills); a work returned
        makes it run (KV transfers)."""
        return None

    def cache_allocated(self, blocks: Callable[[], PagedKVBlocks]) -> None:
        """The rank's KV cache was (re)allocated; `blocks()` describes it as a connector copies it."""
        return None

    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache this feature keeps per token beside the model's (a draft layer's)."""
        return 0

    def allocate_cache(self, num_kv_blocks: int) -> int:
        """Its cache on the engine's block ids, with the model's; returns its bytes."""
        return 0

    def weights(self) -> torch.nn.Module | None:
        """Weights it holds beside the model's (a draft layer), for the rank's memory accounting."""
        return None

    def graph_query_len(self) -> int:
        """Tokens per row of the multi-token steps a verify graph should run (1 + k drafts); 1: none."""
        return 1

    def regroup_blocker(self) -> str | None:
        """Why the rank's runner cannot be kept through an expert-parallel regroup with this feature on (its
        experts are not grown in place: the runner is rebuilt), or None (engine/rank/keep_runner.py)."""
        return None

    def graph_input(self) -> GraphTokenInput | None:
        """The per-token input this feature's steps give a replayed graph (StepWork.graph_tokens_T), captured
        with the graphs; None: none."""
        return None

    def collect(self, out: ModelRunnerOutput) -> None:
        return None

    def close(self) -> None:
        """The rank shuts down or drops its runner: release what the feature holds (sockets, threads)."""
        return None


class GraphTokenInput(Protocol):
    """A per-token input a captured forward reads (LoRA's slots, engine/lora/slots.py): the graphs capture their
    forwards inside `captured(static_T)`, and a replay copies the step's values into that static buffer first."""

    def captured(self, static_T: torch.Tensor) -> AbstractContextManager[None]: ...


@dataclass(frozen=True)
class RankModel:
    """What a feature is made from on a rank: the loaded model and what the runner built it with."""

    cfg: ModelConfig  # the rank's view (TP: its heads)
    model: torch.nn.Module  # the decoder (engine/models/moe_decoder.py); a feature names the calls it makes
    kernels: Kernels
    device: torch.device
    ep: ExpertParallel | None
    tp_size: int
    load_format: str
    rank: int = 0  # the worker's rank in the engine (a KV connector's worker half is made per rank)
    model_cfg: ModelConfig | None = None  # the whole model's config (`cfg` is this rank's view under TP)
    block_size: int = 16
    tp: TensorParallel | None = None


class StepFeature(Protocol):
    """A registered feature (engine/rank/step_features.py): its plug-in for a rank, or None when the worker's
    configuration leaves it off."""

    name: str

    def make(self, rank: RankModel, config: WorkerConfig) -> StepPlugin | None: ...


def step_plugins(features: Sequence[StepFeature], rank: RankModel, config: WorkerConfig) -> list[StepPlugin]:
    """The plug-ins of the features `config` turns on, for this rank, in the features' order."""
    return [p for f in features if (p := f.make(rank, config)) is not None]


def overrides(plugin: StepPlugin | StepWork[Payload], base: type, hook: str) -> bool:
    """Whether `plugin`'s class defines `hook` itself (not the base's no-op): the runner calls only those."""
    return getattr(type(plugin), hook) is not getattr(base, hook)


__all__ = ["DeviceInputs", "DeviceStep", "ForwardExtras", "GraphTokenInput", "HeldRequest", "RankModel",
           "SampledRows", "SamplingContext", "StepBatch", "StepFeature", "StepPlugin", "StepWork", "overrides",
           "step_plugins"]
