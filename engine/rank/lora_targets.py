"""A rank's LoRA (engine/lora/): the slots and hooks on the model's target linears, and a step's slot writes and
per-token slots run in its device work."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from moelink.moe.expert_weights import FloatExperts

from ..config.lora import LoRAConfig
from ..lora.adapter import EXPERT_NAME, model_targets
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
        moe, m = moes.get(id(entry.dest)), EXPERT_NAME.match(name)
        if moe is not None and m is not None:
            e, f, d = moe.w13_EFD.shape
            # EP: the logical expert of each local slot (redundant copies too); TP: every expert's channel slice.
            held = tuple(moe.ep.local_experts) if moe.ep is not None else None
            shard = (tp.rank * (f // 2), tp.size * (f // 2)) if tp is not None else None
            experts[m.group("p")] = ExpertTarget(moe, e, d, f // 2, held, shard)
    return LoRASlots(limits, targets, experts, kernels, dtype, device, model_targets(model_dir))


def begin_lora_step(slots: LoRASlots, loads: list[Callable[[], None]], slots_T: np.ndarray | None,
                    carry: bool = False) -> None:
    """In the step's device work, before its forward: the slot writes owed (stream order: a step launched before
    them read the slots' old adapters), then the step's per-token slots and whether its dispatch carries them."""
    for load in loads:
        load()
    slots.begin_step(slots_T, carry)


__all__ = ["LoRASlots", "begin_lora_step", "lora_slots"]
