"""Elastic EP: a survivor keeps its model runner through a recovery (engine/cluster/elastic.py).

Attention is data parallel: a survivor's KV cache holds only its own requests and does not depend on the EP
size. So at EP N-1 a survivor keeps its runner whole (dense weights, KV cache, request states, the experts it
holds) and only changes what the group size decides:

- its MoE layers' expert slots grow by the experts `survivor_placement` newly puts on it (those only lost ranks
  held), appended after its own in local slot order, and only those are read from the checkpoint (the
  model's own weight plan, restricted to the new slots: `load_added_experts`);
- every MoE layer takes the new placement's tables (`moe.layer.own_tables`), its ExpertParallel (shared by
  every layer) the new rank, size, placement and all-to-all;
- the step plan and the decode graphs follow the new size (graphs are captured again on the new all-to-all).

`keep_blocker` says why a rank cannot keep its runner (the driver then rebuilds every survivor, as before):
no runner, a layer whose slots are not the prefix of its new share (online EPLB re-placed it: a layout
change), expert state a slot copy would not carry, or new slots that do not fit beside the old ones (the
growth copies a layer's stacked weights once, so that copy has to fit too).
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import torch
from torch import nn

from moelink.moe.expert_move import moe_layers, slot_bytes, slot_tensors
from moelink.moe.expert_weights import QuantizeOnLoad
from moelink.moe.layer import ExpertParallel, own_tables

from .loader import load_plan, open_checkpoint
from .step_plan import make_step_plan

logger = logging.getLogger(__name__)


def free_device_bytes(device: torch.device, memory_utilization: float) -> int:
    """Bytes this rank may still take: on a GPU up to `memory_utilization` of the device, on a CPU the memory
    available now."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(total * memory_utilization) - (total - free)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def growth_bytes(layers: Sequence[nn.Module], num_added: int) -> int:
    """Peak extra bytes of adding `num_added` slots to every layer: the new slots of all layers (loaded first),
    plus the largest layer's grown stack while it is copied (the old stack is freed after)."""
    if not num_added:
        return 0
    per_slot = [slot_bytes(layer) for layer in layers]
    return num_added * sum(per_slot) + max(b * (layer.num_local_slots + num_added)
                                           for b, layer in zip(per_slot, layers))


def keep_blocker(runner, old_rank: int, new_experts: Sequence[int], free_bytes: int) -> str | None:
    """Why this rank cannot keep `runner` at its new share `new_experts` (its local slot order), or None.
    `free_bytes`: what it may still allocate (`free_device_bytes`)."""
    if runner is None or runner.ep is None:
        return "the rank has no expert-parallel model runner to keep"
    refusal = next((why for p in runner.plugins if (why := p.regroup_blocker()) is not None), None)
    if refusal is not None:  # e.g. an MTP drafter's MoE layer
        return refusal
    layers = moe_layers(runner.model)
    for layer in layers:
        held = layer.placement.experts_on_rank(old_rank)
        if list(new_experts[:len(held)]) != list(held):
            return (f"MoE layer {layer.moe_index} holds experts {held} on rank {old_rank}, not the start of its new "
                    f"share {list(new_experts)} (online EPLB re-placed it): a layout change")
    added = len(new_experts) - layers[0].num_local_slots if layers else 0
    try:
        need = growth_bytes(layers, added)
    except ValueError as exc:  # expert state that is not per slot (moe/expert_move.slot_bytes)
        return str(exc)
    if need > free_bytes:
        return (f"its {added} new expert slot(s) need {need / 2**20:.1f} MiB beside the old ones, "
                f"{max(free_bytes, 0) / 2**20:.1f} MiB are free")
    return None


def _dest(param) -> torch.Tensor:
    return param.weight if isinstance(param, QuantizeOnLoad) else param


def load_added_experts(model, checkpoint: str, added: Sequence[int], device: torch.device,
                       load_format: str = "auto") -> list[dict[str, nn.Parameter]]:
    """The per-slot tensors of experts `added` for every MoE layer of `model` ([layer][name], `added` in that
    order), read from `checkpoint` (made at random under load_format "dummy") by the model's own weight plan:
    each layer's per-slot parameters are swapped for holders of len(added) slots while the plan is built, and only
    the entries that fill a holder are read."""
    layers = moe_layers(model)
    saved_ids, originals, holders = model.expert_ids, [], []
    try:
        model.expert_ids = list(added)
        for layer in layers:
            own = slot_tensors(layer, layer.num_local_slots)
            originals.append({n: getattr(layer, n) for n in own})
            held = {n: nn.Parameter(torch.empty((len(added), *w.shape[1:]), dtype=w.dtype, device=w.device),
                                    requires_grad=False) for n, w in own.items()}
            for n, p in held.items():
                setattr(layer, n, p)
            holders.append(held)
        source = open_checkpoint(model.cfg, load_format, device, checkpoint)
        wanted = {id(p) for held in holders for p in held.values()}
        plan = {name: e for name, e in model.weight_plan(source.keys()).items() if id(_dest(e[0])) in wanted}
        covered = {id(_dest(e[0])) for e in plan.values()} | {id(e[0].scale) for e in plan.values()
                                                               if isinstance(e[0], QuantizeOnLoad)}
        if wanted - covered:  # a holder no plan entry fills would serve garbage: refuse
            raise RuntimeError("elastic EP: the weight plan does not fill every new expert slot; rebuild instead")
        load_plan(source, plan, device)
    finally:
        model.expert_ids = saved_ids
        for layer, own in zip(layers, originals):
            for n, p in own.items():
                setattr(layer, n, p)
    return holders


def keep_runner(runner, ep: ExpertParallel, checkpoint: str, two_batch_overlap: bool,
                cuda_graph_sizes: tuple[int, ...], load_format: str = "auto") -> int:
    """Make `runner` run `ep` (this rank's share at the new size; its local experts start with the ones the
    runner holds, `keep_blocker`): load the added experts, grow every MoE layer's slots, switch the layers'
    tables and the shared ExpertParallel, re-plan steps and graphs. The KV cache and request states stay.
    Returns the bytes of expert weights loaded."""
    layers = moe_layers(runner.model)
    n_old = layers[0].num_local_slots
    new_ids = list(ep.local_experts)
    added = new_ids[n_old:]
    loaded = 0
    if added:
        holders = load_added_experts(runner.model, checkpoint, added, runner.device, load_format)
        with torch.no_grad():
            for layer, held in zip(layers, holders):
                for n, w in slot_tensors(layer, n_old).items():
                    setattr(layer, n, nn.Parameter(torch.cat([w, held[n].data]), requires_grad=False))
                    loaded += held[n].numel() * held[n].element_size()
                layer.num_local_slots = len(new_ids)
        del holders
    shared = runner.ep  # every MoE layer holds this one object
    shared.rank, shared.world_size, shared.placement = ep.rank, ep.world_size, ep.placement
    shared.all_to_all, shared.tables = ep.all_to_all, ep.tables
    for layer in layers:
        layer.ep_tables = own_tables(shared)
        layer.placement = ep.placement
    runner.model.expert_ids = new_ids
    runner.model.moe_stats.reset()  # what the broken step counted (it never reported) is not traffic
    runner.step_plan = make_step_plan(two_batch_overlap, ep.world_size)
    # Decode graphs replayed the old all-to-all's buffers: capture again on the new one (every rank together,
    # as at start: the executor's load is a collective), or run eagerly when the new backend cannot.
    runner.graphs = None
    runner.graph_sizes = runner._graph_sizes(cuda_graph_sizes, shared, runner.graph_backend)
    if runner.graph_sizes and runner.kv_caches:
        runner._capture_graphs()
    logger.info("elastic EP: rank %d kept its runner (KV cache, requests, %d experts); loaded %d new expert(s) "
                "%s (%.1f MiB)", ep.rank, n_old, len(added), added, loaded / 2**20)
    return loaded


__all__ = ["free_device_bytes", "growth_bytes", "keep_blocker", "keep_runner", "load_added_experts"]
