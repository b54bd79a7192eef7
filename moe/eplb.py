"""EPLB: choose, per MoE layer, which experts get redundant copies and which rank holds each copy.

Legend: L MoE layers, G logical experts, R ranks, P physical slots (G + redundant).

DeepSeek's expert-parallel load balancer, in three steps per layer, from a load
matrix load_LG (routed (token, expert) pairs over a recent window):

1. Pack expert groups to nodes (hierarchical variant only): the G experts form
   `num_groups` equal groups (the router's groups: experts a group-limited
   router picks together); each node takes num_groups / num_nodes whole groups,
   by balanced packing of the group loads. Keeping a group on one node keeps a
   token's experts, which group-limited routing sends to few groups, on few nodes.
2. Replicate within each node: the node's experts fill its slots; each extra
   slot copies the expert with the highest load per copy (load / copies), so
   hot experts get copies and every copy carries about the same load.
3. Pack the physical copies (each weighing load / copies: the replica rule of
   moe/placement.py spreads an expert's tokens evenly over its copies) to the
   node's ranks by greedy balanced packing: heaviest first, to the least
   loaded rank with a free slot that does not hold that expert yet.

The global variant (groups do not divide nodes, ranks are not spread evenly
over nodes, or one node) runs steps 2 and 3 once over all experts and ranks.

moelink's constraints, which DeepSeek's reference does not have: ranks keep
their slot counts (`slots_per_rank`: the stacked weights keep their shapes, so
a new placement only moves weights), and a rank never holds two copies of one
expert. To move few weights, packs of equal size are handed to the ranks whose
previous experts they share most, and an expert a rank already held keeps its
local slot.

Deterministic: ties break by lower id, so every rank computing the same window
gets the same placement.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .placement import ExpertPlacement


def rank_load(placement: ExpertPlacement, load_G) -> np.ndarray:
    """Predicted load of each rank [R] (float64): each expert's load split evenly over its copies."""
    load_G = np.asarray(load_G, dtype=np.float64)
    copies_G = np.zeros(placement.num_experts)
    for e in placement.phy2log:
        copies_G[e] += 1
    share_G = load_G / copies_G
    return np.array([share_G[placement.experts_on_rank(r)].sum() for r in range(placement.ep_size)])


def imbalance(rank_load_R: np.ndarray) -> float:
    """max / mean of the ranks' loads (1.0 = perfectly even; 1.0 with no load at all)."""
    mean = float(np.mean(rank_load_R))
    return float(np.max(rank_load_R)) / mean if mean > 0 else 1.0


@dataclass(frozen=True)
class EPLBResult:
    """One placement per MoE layer and the predicted rank loads [L, R] before (the previous placements) and
    after. `imbalance_*` averages the layers' max/mean."""

    placements: tuple[ExpertPlacement, ...]
    rank_load_before_LR: np.ndarray
    rank_load_after_LR: np.ndarray

    @property
    def imbalance_before(self) -> float:
        return float(np.mean([imbalance(row) for row in self.rank_load_before_LR]))

    @property
    def imbalance_after(self) -> float:
        return float(np.mean([imbalance(row) for row in self.rank_load_after_LR]))


def rebalance_experts(load_LG, previous: ExpertPlacement | Sequence[ExpertPlacement], *,
                      num_redundant: int | None = None, num_groups: int = 1,
                      node_of_rank: Sequence[int] | None = None) -> EPLBResult:
    """New per-layer placements for load_LG [L, G] (module docstring).

    previous: the current placement (one for all layers, or one per layer): it fixes G, R and each rank's slot
    count, and what the new placement should keep in place. num_redundant: must equal previous's (the slot
    counts do not change); None takes it. num_groups: expert groups (DeepSeek's n_group; 1 = no groups).
    node_of_rank: the node of each rank (None: all on one node).
    """
    load_LG = np.asarray(load_LG, dtype=np.float64)
    prev = tuple(previous) if not isinstance(previous, ExpertPlacement) else None
    if load_LG.ndim != 2 or load_LG.shape[0] < 1:
        raise ValueError(f"rebalance_experts: load_LG must be a 2-D [layers, experts] array, got shape "
                         f"{load_LG.shape}.")
    L, G = load_LG.shape
    prevs = prev if prev is not None else (previous,) * L
    if len(prevs) != L or not all(isinstance(p, ExpertPlacement) for p in prevs):
        raise ValueError(f"rebalance_experts: previous must be an ExpertPlacement or one per layer ({L}).")
    if not np.all(np.isfinite(load_LG)) or np.any(load_LG < 0):
        raise ValueError("rebalance_experts: load_LG must hold finite loads >= 0.")
    first = prevs[0]
    if any(p.num_experts != G for p in prevs):
        raise ValueError(f"rebalance_experts: load_LG has {G} experts but the previous placement has "
                         f"{first.num_experts}.")
    if any(p.slots_per_rank != first.slots_per_rank for p in prevs):
        raise ValueError("rebalance_experts: the previous placements must give every rank the same slot count "
                         "in every layer.")
    if num_redundant is not None and num_redundant != first.num_redundant:
        raise ValueError(f"rebalance_experts: num_redundant={num_redundant} differs from the current placement's "
                         f"{first.num_redundant}; the slot counts are fixed while serving.")
    R = first.ep_size
    nodes = _nodes(node_of_rank, R)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or G % num_groups:
        raise ValueError(f"rebalance_experts: num_groups must be a positive integer dividing num_experts={G}, "
                         f"got {num_groups!r}.")
    slots_R = first.slots_per_rank
    hierarchical = (len(nodes) > 1 and num_groups % len(nodes) == 0 and len({len(n) for n in nodes}) == 1
                    and len({sum(slots_R[r] for r in n) for n in nodes}) == 1)
    placements, before, after = [], [], []
    for l in range(L):
        layout = _place_layer(load_LG[l], slots_R, nodes if hierarchical else [list(range(R))],
                              num_groups if hierarchical else 1, prevs[l])
        new = ExpertPlacement(num_experts=G, ep_size=R, layout=layout)
        placements.append(new)
        before.append(rank_load(prevs[l], load_LG[l]))
        after.append(rank_load(new, load_LG[l]))
    return EPLBResult(tuple(placements), np.array(before), np.array(after))


def _nodes(node_of_rank, R: int) -> list[list[int]]:
    if node_of_rank is None:
        return [list(range(R))]
    if len(node_of_rank) != R or any(isinstance(n, bool) or not isinstance(n, int) for n in node_of_rank):
        raise ValueError(f"rebalance_experts: node_of_rank must list one integer node per rank ({R}), got "
                         f"{list(node_of_rank)!r}.")
    return [[r for r in range(R) if node_of_rank[r] == n] for n in sorted(set(node_of_rank))]


def _place_layer(load_G: np.ndarray, slots_R, nodes: list[list[int]], num_groups: int,
                 prev: ExpertPlacement) -> list[list[int]]:
    G = len(load_G)
    size = G // num_groups
    group_load = load_G.reshape(num_groups, size).sum(1)
    per_node = num_groups // len(nodes)
    packs = balanced_packing(group_load, [per_node] * len(nodes))  # step 1 (one pack when global)
    layout: list[list[int]] = [[] for _ in slots_R]
    for n, ranks in enumerate(nodes):
        experts = [e for g in sorted(packs[n]) for e in range(g * size, (g + 1) * size)]
        copies = replicate(load_G[experts], sum(slots_R[r] for r in ranks), len(ranks))  # step 2
        items = [(experts[i], load_G[experts[i]] / c) for i, c in enumerate(copies) for _ in range(c)]
        rank_packs = balanced_packing([w for _, w in items], [slots_R[r] for r in ranks],
                                      keys=[e for e, _ in items])  # step 3
        held = [[items[i][0] for i in p] for p in rank_packs]
        for r, experts_r in zip(ranks, _match_to_ranks(held, ranks, slots_R, prev)):
            layout[r] = _keep_slots(experts_r, prev.experts_on_rank(r))
    return layout


def replicate(load_E, num_slots: int, max_copies: int) -> list[int]:
    """Copies of each of E experts filling num_slots (>= E): each extra slot to the highest load per copy
    among experts with fewer than max_copies (ties: lower index)."""
    load_E = np.asarray(load_E, dtype=np.float64)
    E = len(load_E)
    if num_slots < E or num_slots > E * max_copies:
        raise ValueError(f"EPLB: {num_slots} slots cannot hold {E} experts with at most {max_copies} copies each "
                         "(one per rank): use fewer redundant experts.")
    copies = [1] * E
    for _ in range(num_slots - E):
        e = max((i for i in range(E) if copies[i] < max_copies), key=lambda i: (load_E[i] / copies[i], -i))
        copies[e] += 1
    return copies


def balanced_packing(weights, capacities: Sequence[int], keys: Sequence[int] | None = None) -> list[list[int]]:
    """Item indices per pack: heaviest item first, to the lightest pack with room (ties: lower pack). Pack p
    takes exactly capacities[p] items (their sum must be len(weights)). With `keys`, a pack never takes two
    items of one key; when greedy order leaves an item only packs that hold its key, an item of another pack
    moves into one of them to make room."""
    w = np.asarray(weights, dtype=np.float64)
    if sum(capacities) != len(w):
        raise ValueError(f"balanced_packing: capacities sum to {sum(capacities)}, but there are {len(w)} items.")
    keys = list(range(len(w))) if keys is None else list(keys)
    packs: list[list[int]] = [[] for _ in capacities]
    load = [0.0] * len(capacities)
    for i in sorted(range(len(w)), key=lambda i: (-w[i], keys[i], i)):
        free = [p for p in range(len(packs)) if len(packs[p]) < capacities[p]]
        ok = [p for p in free if all(keys[j] != keys[i] for j in packs[p])]
        if ok:
            p = min(ok, key=lambda p: (load[p], p))
        else:  # make room: move an item x from pack q (which lacks key i) to a free pack f (which lacks x's key)
            p, f, x = _swap(packs, keys, free, i)
            packs[p].remove(x)
            packs[f].append(x)
            load[p] -= w[x]
            load[f] += w[x]
        packs[p].append(i)
        load[p] += w[i]
    return packs


def _swap(packs, keys, free, i) -> tuple[int, int, int]:
    for f in free:
        for q in range(len(packs)):
            if q == f or any(keys[j] == keys[i] for j in packs[q]):
                continue
            for x in packs[q]:
                if all(keys[j] != keys[x] for j in packs[f]):
                    return q, f, x
    raise ValueError("EPLB: no placement keeps every copy of an expert on a different rank with these slot "
                     "counts: use fewer redundant experts.")


def _match_to_ranks(held: list[list[int]], ranks: list[int], slots_R, prev: ExpertPlacement) -> list[list[int]]:
    """Hand the packs to the node's ranks (same slot count only), most experts in common first."""
    out: list[list[int] | None] = [None] * len(ranks)
    pairs = sorted(((-len(set(h) & set(prev.experts_on_rank(r))), k, p)
                    for p, h in enumerate(held) for k, r in enumerate(ranks) if len(h) == slots_R[r]))
    used = set()
    for _, k, p in pairs:
        if out[k] is None and p not in used:
            out[k] = held[p]
            used.add(p)
    return out


def _keep_slots(experts: list[int], before: list[int]) -> list[int]:
    """Order `experts` so each one `before` already held keeps its local slot; the rest fill the gaps."""
    slots: list[int | None] = [e if e in experts else None for e in before[: len(experts)]]
    slots += [None] * (len(experts) - len(slots))
    rest = iter(sorted(e for e in experts if e not in slots))
    return [e if e is not None else next(rest) for e in slots]


class LoadWindow:
    """The sum of the last `steps` per-step expert-load matrices [L, G] (a sliding window)."""

    def __init__(self, steps: int, num_layers: int, num_experts: int):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"LoadWindow.steps must be an integer >= 1, got {steps!r}.")
        self.steps = steps
        self._rows: deque[np.ndarray] = deque()
        self.total_LG = np.zeros((num_layers, num_experts), dtype=np.int64)

    def add(self, counts_LG) -> None:
        counts_LG = np.asarray(counts_LG, dtype=np.int64)
        if counts_LG.shape != self.total_LG.shape:
            raise ValueError(f"LoadWindow.add: counts have shape {counts_LG.shape}, expected {self.total_LG.shape}.")
        self._rows.append(counts_LG.copy())
        self.total_LG += counts_LG
        if len(self._rows) > self.steps:
            self.total_LG -= self._rows.popleft()

    def __len__(self) -> int:
        return len(self._rows)


__all__ = ["EPLBResult", "LoadWindow", "balanced_packing", "imbalance", "rank_load", "rebalance_experts",
           "replicate"]
