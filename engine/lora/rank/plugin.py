"""A rank's LoRA (engine/lora/) as a step plug-in (engine/contract/step_plugin.py): the slots and hooks on the model's
target linears, each held request's slot, and a step's slot writes and per-token slots run in its device work."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from moelink.moe.expert_weights import FloatExperts
from moelink.moe.weight_plan import Rearranged

from ...config.lora import LoRAConfig
from ...contract.step_plugin import DeviceStep, GraphTokenInput, HeldRequest, RankModel, StepBatch, StepPlugin, StepWork
from ..adapter import EXPERT_NAME, experts_name, model_targets
from ..experts import in_graphs
from ..slots import ExpertTarget, LoRASlots, LoRATarget
from ...models.linear import lora_targets

if TYPE_CHECKING:
    from moelink.scheduler.outputs import NewRequestData, SchedulerOutput

    from ...config.worker_config import WorkerConfig


def lora_slots(model, limits: LoRAConfig, kernels, dtype: torch.dtype, device: torch.device,
               model_dir: str) -> LoRASlots:
    """`limits.num_slots` slots over every target of `model` a LoRA adapter may reach: its linears applied to
    activations, float or FP8 (a TP shard's at its rows or columns), and its MoE layers' float experts as this rank
    holds them (EP: its local experts; TP: every expert's channel slice; not both); adapters are read and checked
    against the checkpoint at `model_dir` (model_targets)."""
    plan = model.weight_plan()
    targets = {name: LoRATarget(lin, rows, rows.stop - rows.start, lin.in_features, row_sel, col_sel)
               for name, (lin, rows, row_sel, col_sel) in lora_targets(model, plan).items()}
    experts = {}
    tp = model.tp if model.tp is not None and model.tp.size > 1 else None
    moes = {id(layer.moe.w13_EFD): layer.moe for layer in model.layers
            if getattr(layer, "moe", None) is not None and not (layer.moe.ep is not None and tp is not None)
            and isinstance(layer.moe.expert_format, FloatExperts)}
    for name, entry in plan.items():  # each MoE layer's experts by the checkpoint's name for them
        # A TP rank's gpt-oss experts are read through a Rearranged destination (engine/tp/experts.py): its tensor.
        dest = entry.dest.dest if isinstance(entry.dest, Rearranged) else entry.dest
        moe, m = moes.get(id(dest)), EXPERT_NAME.match(name)
        if moe is not None and m is not None:
            e, f, d = moe.w13_EFD.shape
            # EP: the logical expert of each local slot (redundant copies too); TP: every expert's channel slice.
            held = tuple(moe.ep.local_experts) if moe.ep is not None else None
            shard = (tp.rank * (f // 2), tp.size * (f // 2)) if tp is not None else None
            experts[experts_name(m)] = ExpertTarget(moe, e, d, f // 2, held, shard)
    return LoRASlots(limits, targets, experts, kernels, dtype, device, model_targets(model_dir), str(model_dir))


@dataclass
class LoRAStepPlan:
    """A step's LoRA work, planned on the host when it is launched: the slot writes owed (run first in its device
    work, in stream order: a step launched before them read the slots' old adapters), each token's slot (None: no
    row has an adapter), whether its dispatch carries them (EP: the agreed table) and whether a row's adapter
    targets routed experts."""

    loads: list[Callable[[], None]]
    slots_T: np.ndarray | None = None
    carry: bool = False
    experts: bool = False
    experts_in_graphs: bool = False

    @property
    def graphable(self) -> bool:
        """Whether the step may replay a decode graph: a graph captures the linears' LoRA (its slots a static
        input) and, on a backend whose experts' LoRA path has no host loop (Triton: engine/lora/experts.py
        `in_graphs`), the experts'; not the plain-torch experts' path (a host loop over experts) nor a dispatch
        carrying slots (EP)."""
        return not (self.carry or (self.experts and not self.experts_in_graphs))


def plan_lora_step(slots: LoRASlots, slots_S: list[int] | None, query_lens: list[int] | None,
                   ep: bool) -> LoRAStepPlan:
    """The plan of a step of these rows' slots (None: a rank with no tokens of its own, under EP)."""
    loads = slots.take_loads()
    carry = ep and slots.experts_covered()
    if slots_S is None or query_lens is None:
        return LoRAStepPlan(loads, None, carry)
    return LoRAStepPlan(loads, slots.token_slots(slots_S, query_lens), carry, slots.rows_cover_experts(slots_S),
                        in_graphs(slots.kernels))


def begin_lora_step(slots: LoRASlots, plan: LoRAStepPlan, replay: bool = False) -> None:
    """In the step's device work, before its forward: the slot writes owed, then the step's per-token slots and
    whether its dispatch carries them; `replay`: a decode graph runs the step, reading the slots staged with its
    inputs (cuda_graph.DecodeGraphs), so only the writes run here."""
    for load in plan.loads:
        load()
    if replay:
        slots.begin_step(None)
    else:
        slots.begin_step(plan.slots_T, plan.carry, plan.experts)




class _Step(StepWork[None]):
    """A step's LoRA work in its device work: the writes owed and the per-token slots before the forward; after
    it, no adapter (warm-up and other forwards run none)."""

    def __init__(self, slots: LoRASlots, plan: LoRAStepPlan):
        self.slots, self.plan = slots, plan
        self.graphable = plan.graphable
        self.graph_tokens_T = plan.slots_T

    def before_forward(self, dev: DeviceStep) -> None:
        begin_lora_step(self.slots, self.plan, replay=dev.replay)

    def after_forward(self, dev: DeviceStep, h_TD: torch.Tensor) -> None:
        self.slots.begin_step(None)


class LoRAPlugin(StepPlugin):
    """LoRA on a rank: the adapters the driver holds requests for read ahead, each held request's slot (its
    adapter loaded into one when it joins), each step's per-token slots."""

    name = "lora"

    def __init__(self, slots: LoRASlots, ep: bool):
        self.slots, self.ep = slots, ep
        self._held: dict[str, tuple[int, int]] = {}  # request id -> (its slot, its adapter's id)
        self._table = False  # DP attention: each request's slot is its adapter's in the driver's table

    def before_step(self, so: SchedulerOutput) -> None:
        if so.lora_prefetch:  # adapters the driver holds requests for: read them ahead
            self.slots.host.prefetch(so.lora_prefetch)
        self._table = so.lora_table is not None
        if so.lora_table is not None:  # DP attention: the driver's table, every rank's
            self.slots.sync_table(so.lora_table)

    def admit(self, new: NewRequestData, state: HeldRequest) -> None:
        if new.lora is not None:
            slot = self.slots.slot_for(new.lora, {s for s, _ in self._held.values()})
            self._held[new.req_id] = (slot, new.lora.lora_int_id)

    def release(self, req_id: str, preempted: bool) -> None:
        self._held.pop(req_id, None)

    def reset(self) -> None:
        self._held = {}

    def _slot(self, req_id: str) -> int:
        held = self._held.get(req_id)
        if held is None:
            return -1
        return self.slots.slot_of(held[1]) if self._table else held[0]

    def plan(self, batch: StepBatch) -> StepWork | None:
        slots_S = [self._slot(st.req_id) for st in batch.states] if self._held else [-1] * len(batch.states)
        return _Step(self.slots, plan_lora_step(self.slots, slots_S, batch.query_lens, self.ep))

    def plan_idle(self, so: SchedulerOutput, runs: bool) -> StepWork | None:
        """An empty step's LoRA work under EP: the slot writes owed, and whether its dispatch carries slots (as its
        peers' do: the agreed table); none in a step that runs nothing (the writes wait for the next that runs)."""
        return _Step(self.slots, plan_lora_step(self.slots, None, None, self.ep)) if runs else None

    def graph_input(self) -> GraphTokenInput | None:
        return self.slots


class LoRAFeature:
    """On with enable_lora (WorkerConfig.lora): hooks on the target linears and `max_loras` device slots, made
    with the runner, before warm-up and graph capture (decode graphs read each replay's per-token slots from a
    static buffer: engine/rank/cuda_graph.DecodeGraphs)."""

    name = LoRAPlugin.name

    def make(self, rank: RankModel, config: WorkerConfig) -> StepPlugin | None:
        if config.lora is None:
            return None
        return LoRAPlugin(lora_slots(rank.model, config.lora, rank.kernels, rank.cfg.dtype, rank.device,
                                     rank.cfg.model), rank.ep is not None)


FEATURE = LoRAFeature()

__all__ = ["FEATURE", "LoRAPlugin", "LoRASlots", "LoRAStepPlan", "begin_lora_step", "lora_slots", "plan_lora_step"]
