"""Engine-side totals of the per-step MoE counters that every rank reports, and the expert-load report.

Legend: L MoE layers, G logical experts, R ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class MoEMetrics:
    """Cumulative since engine start: expert load, all-to-all volume and time."""

    num_moe_layers: int
    num_experts: int
    world_size: int
    tokens_per_expert: np.ndarray = field(init=False)  # int64 [L, G], summed over ranks
    bytes_dispatched: int = 0
    bytes_combined: int = 0
    tokens_dispatched: int = 0
    bytes_dispatched_per_rank: list[int] = field(init=False)
    dispatch_s: float = 0.0
    compute_s: float = 0.0
    combine_s: float = 0.0
    steps: int = 0
    # The last step alone, for "this step" views (metrics, the benchmark).
    last_step_bytes_dispatched: int = 0
    # Node-aware all-to-all ("two_level") only: dispatch rows and payload bytes that crossed between nodes
    # (combine sends as many back), counted apart from the totals above, which include them.
    inter_node_rows: int = 0
    bytes_inter_node: int = 0
    last_step_bytes_inter_node: int = 0
    rows_received: int = 0
    wire_rows: int = 0  # dispatch rows on the wire, padding included (combine moves as many back)
    wire_bytes: int = 0
    # Per dispatch mode (comm/ep_modes.py: "low_latency", "high_throughput", or "exact"): steps, pairs (routed
    # (token, expert) pairs, all MoE layers), rows (sent, one per token and destination rank), wire_rows, bytes
    # (payload) and wire_bytes, all ranks together.
    per_mode: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tokens_per_expert = np.zeros((self.num_moe_layers, self.num_experts), dtype=np.int64)
        self.bytes_dispatched_per_rank = [0] * self.world_size

    def regroup(self, kept: list) -> None:
        """The group changed (elastic EP): new rank i was old rank `kept[i]` (None: a replacement, from 0)."""
        self.world_size = len(kept)
        self.bytes_dispatched_per_rank = [0 if r is None else self.bytes_dispatched_per_rank[r] for r in kept]

    def add_step(self, per_rank) -> None:
        """`per_rank[r]` is that rank's MoEStepStats, or None when it ran no forward."""
        if all(s is None for s in per_rank):
            return
        self.steps += 1
        step_bytes = step_inter = 0
        modes = set()
        for r, s in enumerate(per_rank):
            if s is None:
                continue
            self.rows_received += s.rows_received
            self.wire_rows += s.wire_rows
            self.wire_bytes += s.wire_bytes
            if s.ep_mode:
                m = self.per_mode.setdefault(s.ep_mode, dict(steps=0, pairs=0, rows=0, wire_rows=0, bytes=0,
                                                             wire_bytes=0))
                m["pairs"] += int(s.tokens_per_expert.sum())
                m["rows"] += s.tokens_dispatched
                m["wire_rows"] += s.wire_rows
                m["bytes"] += s.bytes_dispatched
                m["wire_bytes"] += s.wire_bytes
                if s.ep_mode not in modes:
                    modes.add(s.ep_mode)
                    m["steps"] += 1
            self.tokens_per_expert += s.tokens_per_expert
            self.bytes_dispatched += s.bytes_dispatched
            self.bytes_combined += s.bytes_combined
            self.tokens_dispatched += s.tokens_dispatched
            self.bytes_dispatched_per_rank[r] += s.bytes_dispatched
            step_bytes += s.bytes_dispatched
            self.inter_node_rows += s.inter_node_rows
            step_inter += s.bytes_inter_node
            # Ranks step together: the slowest rank's time is the step's.
        self.dispatch_s += max((s.dispatch_s for s in per_rank if s is not None), default=0.0)
        self.compute_s += max((s.compute_s for s in per_rank if s is not None), default=0.0)
        self.combine_s += max((s.combine_s for s in per_rank if s is not None), default=0.0)
        self.last_step_bytes_dispatched = step_bytes
        self.bytes_inter_node += step_inter
        self.last_step_bytes_inter_node = step_inter

    def total_routed(self) -> int:
        """(token, expert) pairs routed so far: tokens × top-k × MoE layers."""
        return int(self.tokens_per_expert.sum())


@dataclass(frozen=True)
class ExpertLoadReport:
    """Raw expert load since engine start, as the ExpertLoad RPC and `moelink stats` report it.

    `tokens_per_expert_LG[l][g]`: (token, expert) pairs routed to logical expert g in the l-th MoE layer
    (decoder layer `moe_layers[l]`), all ranks together. `experts_on_ranks[r]`: the logical expert of each
    expert slot rank r holds (redundant copies included). Plain tuples: nothing here changes once made.
    """

    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    world_size: int
    experts_on_ranks: tuple[tuple[int, ...], ...]
    tokens_per_expert_LG: tuple[tuple[int, ...], ...]
    bytes_dispatched: int
    bytes_combined: int
    steps: int
    # Online EPLB only (empty / None when off): the current placement of every MoE layer ([L][R], the expert of
    # each slot), and the controller's metrics (engine/cluster/eplb_controller.py `snapshot`).
    experts_on_ranks_per_layer: tuple[tuple[tuple[int, ...], ...], ...] = ()
    eplb: dict | None = None

    def __post_init__(self) -> None:
        if len(self.tokens_per_expert_LG) != len(self.moe_layers):
            raise ValueError(f"ExpertLoadReport.tokens_per_expert_LG has {len(self.tokens_per_expert_LG)} rows: "
                             f"must have one per MoE layer ({len(self.moe_layers)}).")
        if any(len(row) != self.num_experts for row in self.tokens_per_expert_LG):
            raise ValueError(f"ExpertLoadReport.tokens_per_expert_LG rows must each have num_experts="
                             f"{self.num_experts} counts.")
        if len(self.experts_on_ranks) != self.world_size:
            raise ValueError(f"ExpertLoadReport.experts_on_ranks has {len(self.experts_on_ranks)} entries: "
                             f"must have one per rank (world_size={self.world_size}).")
