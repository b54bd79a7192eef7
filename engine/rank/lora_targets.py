"""A rank's LoRA (engine/lora/): the slots and hooks on the model's target linears, and a step's slot writes and
per-token slots run in its device work."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from moelink.moe.expert_weights import FloatExperts
from moelink.moe.weight_plan import Rearranged

from ..config.lora import LoRAConfig
from ..lora.adapter import EXPERT_NAME, experts_name, model_targets
from ..lora.experts import in_graphs
from ..lora.slots import ExpertTarget, LoRASlots, LoRATarget
from ..models.linear import lora_targets


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


__all__ = ["LoRASlots", "LoRAStepPlan", "begin_lora_step", "lora_slots", "plan_lora_step"]
