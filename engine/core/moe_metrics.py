"""Engine-side totals of the per-step MoE counters that every rank reports, and the expert-load report.

Legend: L MoE layers, G logical experts, R ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelink.moe.stats import MoECounters


class MoEMetrics(MoECounters):
    """Cumulative since engine start, all ranks together: every MoECounters counter (expert load, all-to-all
    volume, times: the slowest rank's per step), plus what only a total has: steps, bytes dispatched per rank,
    the last step's bytes, and per dispatch mode (comm/ep_modes.py: "low_latency", "high_throughput" or
    "exact") its steps, pairs (routed (token, expert) pairs, all MoE layers), rows (sent, one per token and
    destination rank), wire_rows, bytes (payload) and wire_bytes."""

    def __init__(self, num_moe_layers: int, num_experts: int, world_size: int):
        super().__init__(np.zeros((num_moe_layers, num_experts), dtype=np.int64))
        self.num_moe_layers = num_moe_layers
        self.num_experts = num_experts
        self.world_size = world_size
        self.steps = 0
        self.bytes_dispatched_per_rank = [0] * world_size
        # The last step alone, for "this step" views (metrics, the benchmark).
        self.last_step_bytes_dispatched = 0
        self.last_step_bytes_inter_node = 0
        self.per_mode: dict[str, dict[str, int]] = {}

    def regroup(self, kept: list) -> None:
        """The group changed (elastic EP): new rank i was old rank `kept[i]` (None: a replacement, from 0)."""
        self.world_size = len(kept)
        self.bytes_dispatched_per_rank = [0 if r is None else self.bytes_dispatched_per_rank[r] for r in kept]

    def add_step(self, per_rank: "list[MoECounters | None]") -> None:
        """`per_rank[r]` is that rank's counters of one step, or None when it ran no forward."""
        ran = [s for s in per_rank if s is not None]
        if not ran:
            return
        self.steps += 1
        self.add_ranks(ran)
        for r, s in enumerate(per_rank):
            if s is not None:
                self.bytes_dispatched_per_rank[r] += s.bytes_dispatched
        self.last_step_bytes_dispatched = sum(s.bytes_dispatched for s in ran)
        self.last_step_bytes_inter_node = sum(s.bytes_inter_node for s in ran)
        for mode in dict.fromkeys(s.ep_mode for s in ran if s.ep_mode):  # first-seen order
            in_mode = [s for s in ran if s.ep_mode == mode]
            m = self.per_mode.setdefault(mode, dict(steps=0, pairs=0, rows=0, wire_rows=0, bytes=0, wire_bytes=0))
            m["steps"] += 1
            m["pairs"] += sum(int(s.tokens_per_expert.sum()) for s in in_mode)
            m["rows"] += sum(s.tokens_dispatched for s in in_mode)
            m["wire_rows"] += sum(s.wire_rows for s in in_mode)
            m["bytes"] += sum(s.bytes_dispatched for s in in_mode)
            m["wire_bytes"] += sum(s.wire_bytes for s in in_mode)

    def report(self, moe_layers, top_k: int, experts_on_ranks: list, eplb) -> "ExpertLoadReport":
        """These totals as the ExpertLoad RPC reports them: `experts_on_ranks[r]` is (expert, copies) per slot of
        rank r; `eplb` the online-EPLB controller or None."""
        return ExpertLoadReport(
            moe_layers=tuple(moe_layers), num_experts=self.num_experts, top_k=top_k, world_size=self.world_size,
            experts_on_ranks=tuple(tuple(e for e, _ in held) for held in experts_on_ranks),
            tokens_per_expert_LG=tuple(map(tuple, self.tokens_per_expert.tolist())),
            bytes_dispatched=self.bytes_dispatched, bytes_combined=self.bytes_combined, steps=self.steps,
            experts_on_ranks_per_layer=eplb.experts_on_ranks_per_layer() if eplb else (),
            eplb=eplb.snapshot() if eplb else None)

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
