"""Moving expert weights to a new placement while serving (online EPLB), point-to-point, a few layers at a time.

Legend: L MoE layers, E local expert slots of a rank.

Every rank builds the same `plan_moves(old, new)` (the placements are the
driver's, the same everywhere), so sends and receives pair up without talk.
A slot whose expert stays put moves nothing; an expert the rank held in
another slot is a local copy; otherwise the slot is received from a rank that
held the expert (the least-used sender among its copies, lowest rank on ties).

`ExpertMover` runs the plan in chunks between steps (`move(num_layers)`: every
rank calls it together, over the EP process group, gloo on CPU). A chunk first
stages every changed slot of its layers (received weights, and local copies,
go to a staging area: the old slots are still the sources other ranks read),
then, once this rank's sends and receives of the chunk are complete, writes the
staged slots into the layers' stacked weights and swaps in those layers' new
tables, and frees the staging. Every rank does so inside the same gap between
two steps (the driver's collective), so a layer switches weights and tables on
every rank at one step boundary: no step ever sees a half-moved layer, and the
staging holds one chunk at most (`chunk_staging_bytes`, bounded by the
driver: engine/cluster/eplb_controller.py).

What moves: every per-slot tensor of the layer (`slot_tensors`: every parameter
whose first dimension is the local slot count), so a format's scales and
biases travel with its weights (FP8 block scales, MXFP4 blocks + scales, the
expert biases). Sent as raw bytes (a uint8 view): any dtype crosses any
backend bit-exactly.

A rank lost mid-chunk (engine/cluster/elastic.py): the survivors' `move` raises; their
layers of the chunk were not switched (the switch comes after every transfer),
and `abort()` (Worker.reconfigure) frees the staging with the mover.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .placement import ExpertPlacement

if TYPE_CHECKING:
    from .layer import MoELayer

# Layer parameters that are not per local expert slot (the router's, indexed by logical expert).
_NOT_PER_SLOT = ("gate_GD", "gate_bias_G", "e_score_correction_bias_G")


@dataclass(frozen=True)
class Transfer:
    """Slot dst_slot of rank dst in MoE layer `layer` gets the weights in src_slot of rank src (the old
    placement's); src == dst is a local copy."""

    layer: int
    src: int
    src_slot: int
    dst: int
    dst_slot: int


def plan_moves(old: Sequence[ExpertPlacement], new: Sequence[ExpertPlacement]) -> list[Transfer]:
    """Every slot that changes, per layer (module docstring); the same list on every rank."""
    if len(old) != len(new):
        raise ValueError(f"plan_moves: {len(old)} old placements but {len(new)} new ones (one per MoE layer).")
    out: list[Transfer] = []
    for l, (a, b) in enumerate(zip(old, new)):
        if (a.num_experts, a.ep_size, a.slots_per_rank) != (b.num_experts, b.ep_size, b.slots_per_rank):
            raise ValueError(f"plan_moves: layer {l}: the new placement must keep the experts, ranks and slot "
                             f"counts (old {a.slots_per_rank}, new {b.slots_per_rank}).")
        sends = [0] * a.ep_size
        holders = a.log2phy
        for r in range(b.ep_size):
            before = a.experts_on_rank(r)
            for slot, e in enumerate(b.experts_on_rank(r)):
                if before[slot] == e:
                    continue
                if e in before:
                    out.append(Transfer(l, r, before.index(e), r, slot))
                    continue
                src, src_slot = min(holders[e], key=lambda h: (sends[h[0]], h[0]))
                sends[src] += 1
                out.append(Transfer(l, src, src_slot, r, slot))
    return out


def chunk_staging_bytes(transfers: Sequence[Transfer], slot_bytes_L: Sequence[int], first: int, stop: int,
                        ep_size: int) -> list[int]:
    """Bytes each rank stages for layers [first, stop) (every slot it receives or copies locally), [R]."""
    out = [0] * ep_size
    for t in transfers:
        if first <= t.layer < stop:
            out[t.dst] += slot_bytes_L[t.layer]
    return out


def slot_bytes(layer: nn.Module) -> int:
    """Bytes of one local slot of `layer`: every per-slot tensor's (weights, scales, biases). Raises when the
    layer holds expert state a move would not carry (a parameter or buffer that is not per slot, the router's
    excepted): its experts cannot be moved, so online EPLB must stay off."""
    per_slot = slot_tensors(layer, layer.num_local_slots)
    fixed = [n for n, _ in layer.named_parameters(recurse=False) if n not in _NOT_PER_SLOT and n not in per_slot]
    fixed += [n for n, _ in layer.named_buffers(recurse=False)]
    if fixed:
        fmt = layer.expert_format.name
        raise ValueError(f"online EPLB (--eplb-interval) cannot move the experts of MoE layer {layer.moe_index} "
                         f"({fmt} experts): {fixed} are not stacked per expert slot, so a move would leave them "
                         "behind; run without --eplb-interval.")
    return sum(w[0].numel() * w.element_size() for w in per_slot.values())


def _wire(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as uint8 (a view): what crosses the process group, for any dtype (float8 included)."""
    return t.reshape(-1).view(torch.uint8) if t.dtype != torch.uint8 else t.reshape(-1)


def slot_tensors(layer: nn.Module, num_slots: int) -> dict[str, torch.Tensor]:
    """The layer's per-slot tensors (stacked expert weights, their scales and biases): every parameter whose
    first dimension is the local slot count, the router's excepted."""
    return {n: p.data for n, p in layer.named_parameters(recurse=False)
            if n not in _NOT_PER_SLOT and p.dim() >= 1 and p.shape[0] == num_slots}


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The model's expert-parallel MoE layers, in MoE-layer order."""
    from .layer import MoELayer

    found = [m for m in model.modules() if isinstance(m, MoELayer) and m.ep is not None]
    return sorted(found, key=lambda m: m.moe_index)


class ExpertMover:
    """One rank's share of moving `layers` (its MoE layers, in MoE order) from `old` to `new` placements.

    chunk_delay_s: a pause inside every chunk, after its transfers are posted (tests only: it makes a move
    slow enough to kill a rank in the middle of one; not a user flag)."""

    def __init__(self, layers: Sequence[nn.Module], rank: int, group, old: Sequence[ExpertPlacement],
                 new: Sequence[ExpertPlacement], device: torch.device, chunk_delay_s: float = 0.0):
        if len(layers) != len(new):
            raise ValueError(f"ExpertMover: {len(layers)} MoE layers but {len(new)} placements.")
        self.layers, self.rank, self.group, self.new, self.device = list(layers), rank, group, list(new), device
        self.transfers = plan_moves(old, new)
        self.chunk_delay_s = chunk_delay_s
        self._next_layer = 0
        self._staged: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (layer, slot) -> tensors
        self.bytes_sent = 0  # to other ranks (local copies excluded)
        self.bytes_received = 0
        self.peak_staged_bytes = 0  # the most this rank staged in one chunk

    @property
    def done(self) -> bool:
        return self._next_layer >= len(self.layers)

    @property
    def staged_bytes(self) -> int:
        """Bytes staged now (0 between chunks: a chunk frees its staging when it switches)."""
        return sum(t.numel() * t.element_size() for ts in self._staged.values() for t in ts.values())

    def move(self, num_layers: int = 1) -> None:
        """Move the next `num_layers` layers' changed slots and switch those layers to their new placement.
        Collective: every rank, the same argument, between two steps."""
        first, stop = self._next_layer, min(len(self.layers), self._next_layer + max(1, num_layers))
        todo = [t for t in self.transfers if first <= t.layer < stop]
        pending = []
        for i, t in enumerate(todo):
            if self.rank not in (t.src, t.dst):
                continue
            n_slots = self.layers[t.layer].num_local_slots
            src_tensors = slot_tensors(self.layers[t.layer], n_slots)
            if t.src == t.dst:  # local: copy now (the old weights stay in place until the switch)
                self._staged[(t.layer, t.dst_slot)] = {n: w[t.src_slot].clone() for n, w in src_tensors.items()}
                continue
            for j, (n, w) in enumerate(sorted(src_tensors.items())):
                if t.src == self.rank:
                    buf = _wire(w[t.src_slot].contiguous())
                    pending.append(dist.isend(buf, group=self.group, group_dst=t.dst, tag=i * 64 + j))
                    self.bytes_sent += buf.numel()
                else:
                    buf = torch.empty_like(w[t.src_slot])
                    self._staged.setdefault((t.layer, t.dst_slot), {})[n] = buf
                    pending.append(dist.irecv(_wire(buf), group=self.group, group_src=t.src, tag=i * 64 + j))
                    self.bytes_received += buf.numel() * buf.element_size()
        self.peak_staged_bytes = max(self.peak_staged_bytes, self.staged_bytes)
        if self.chunk_delay_s:
            time.sleep(self.chunk_delay_s)
        for work in pending:
            work.wait()
        # Every transfer of the chunk is complete on this rank (its sends left its slots): switch the chunk.
        self._switch(first, stop)
        self._next_layer = stop

    def _switch(self, first: int, stop: int) -> None:
        for (l, slot), tensors in self._staged.items():
            weights = slot_tensors(self.layers[l], self.layers[l].num_local_slots)
            for n, w in tensors.items():
                weights[n][slot].copy_(w)
        for layer, placement in zip(self.layers[first:stop], self.new[first:stop]):
            # In place (the layer's tables are as wide as any placement needs): a captured decode graph keeps
            # reading the same tensors.
            old = layer.ep_tables
            tables = placement.to_tensors(self.device).padded(old.max_replicas)
            old.replica_count_G.copy_(tables.replica_count_G)
            old.replica_rank_GX.copy_(tables.replica_rank_GX)
            old.replica_slot_GX.copy_(tables.replica_slot_GX)
            layer.placement = placement
        self._staged.clear()

    def commit(self) -> None:
        """End the move (every rank, after the last `move`): every layer already switched with its chunk."""
        if not self.done:
            raise RuntimeError("ExpertMover.commit before every layer was moved: call move() until done.")

    def abort(self) -> None:
        """Drop a move a lost rank broke: free the staging (the layers of the broken chunk never switched)."""
        self._staged.clear()
        self._next_layer = len(self.layers)


def tables_match_placement(layer: nn.Module) -> bool:
    """Whether the layer's routing tables are exactly its placement's (no half-switched table)."""
    t = layer.ep_tables
    want = layer.placement.to_tensors(t.replica_count_G.device).padded(t.max_replicas)
    return (torch.equal(t.replica_count_G, want.replica_count_G) and torch.equal(t.replica_rank_GX, want.replica_rank_GX)
            and torch.equal(t.replica_slot_GX, want.replica_slot_GX))


__all__ = ["ExpertMover", "Transfer", "chunk_staging_bytes", "moe_layers", "plan_moves", "slot_bytes", "slot_tensors",
           "tables_match_placement"]
