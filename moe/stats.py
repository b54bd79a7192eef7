"""Expert-load and all-to-all counters, collected per step and per MoE layer.

Legend: L MoE layers, G logical experts.

Token counts accumulate on the device and are read back once per step (one
host sync, in `snapshot`); byte counts are already host integers (the
all-to-all syncs its counts anyway); times are host wall-clock seconds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class MoEStepStats:
    """What one rank measured in one step; plain Python, summed by the engine."""

    tokens_per_expert: np.ndarray  # int64 [L, G]: (token, expert) pairs routed from this rank's tokens
    bytes_dispatched: int = 0
    bytes_combined: int = 0
    tokens_dispatched: int = 0  # rows sent (one per token and destination rank)
    dispatch_s: float = 0.0
    compute_s: float = 0.0
    combine_s: float = 0.0
    per_layer_bytes: list[int] = field(default_factory=list)
    # Node-aware all-to-all only ("two_level"): rows and payload bytes this rank sent across nodes.
    inter_node_rows: int = 0
    bytes_inter_node: int = 0


class MoEStats:
    """Shared by the MoE layers of one model; reset by the runner each step."""

    def __init__(self, num_moe_layers: int, num_experts: int, device: torch.device):
        self.counts_LG = torch.zeros(num_moe_layers, num_experts, dtype=torch.int64, device=device)
        self.num_experts = num_experts
        self._bytes = [0] * num_moe_layers
        self._combined = 0
        self._rows = 0
        self._times = [0.0, 0.0, 0.0]
        # Host timers are only honest where ops run synchronously (CPU); on a GPU
        # they would time kernel launches, so they stay off there.
        self.time_phases = device.type == "cpu"
        # [rows, bytes] sent across nodes, on the device (no sync in the layer); read in `snapshot` only
        # once a node-aware dispatch recorded something.
        self._inter_node_2 = torch.zeros(2, dtype=torch.int64, device=device)
        self._inter_node_seen = False

    def record_routing(self, layer: int, topk_ids_TK: torch.Tensor) -> None:
        if topk_ids_TK.numel():
            # index_add_, not bincount: bincount sizes its output from the data, a host sync on
            # CUDA that would also break CUDA-graph capture. Ids < 0 (padding rows of a decode
            # graph) route nowhere and count for nothing.
            ids = topk_ids_TK.reshape(-1)
            routed = (ids >= 0).to(self.counts_LG.dtype)
            self.counts_LG[layer].index_add_(0, ids.clamp(min=0), routed)

    def record_transfer(self, layer: int, bytes_dispatched: int, bytes_combined: int, rows: int) -> None:
        self._bytes[layer] += bytes_dispatched
        self._combined += bytes_combined
        self._rows += rows

    def record_inter_node(self, rows_R: torch.Tensor, row_bytes: int) -> None:
        """Add one dispatch's rows sent across nodes (int64 device tensor [R], `DispatchMeta.inter_node_rows`)."""
        rows = rows_R.sum()
        self._inter_node_2 += torch.stack([rows, rows * row_bytes])
        self._inter_node_seen = True

    def clock(self) -> float:
        return time.perf_counter() if self.time_phases else 0.0

    def add_times(self, dispatch_s: float, compute_s: float, combine_s: float) -> None:
        self._times[0] += dispatch_s
        self._times[1] += compute_s
        self._times[2] += combine_s

    def reset(self) -> None:
        """Drop what was counted so far (warm-up and capture runs are not traffic)."""
        self.counts_LG.zero_()
        self._bytes = [0] * len(self._bytes)
        self._combined = self._rows = 0
        self._times = [0.0, 0.0, 0.0]
        self._inter_node_2.zero_()
        self._inter_node_seen = False

    def snapshot(self) -> MoEStepStats:
        """Read this step's counters (host sync) and reset them."""
        # Host sync: one small read per step; an array, not nested lists, so summing it
        # on the driver and shipping it through Ray stay cheap at L x G = 58 x 256.
        counts = self.counts_LG.cpu().numpy().copy()
        out = MoEStepStats(counts, sum(self._bytes), self._combined, self._rows, *self._times, list(self._bytes))
        if self._inter_node_seen:
            # Host sync: the second read of the step, only on the node-aware backend.
            out.inter_node_rows, out.bytes_inter_node = self._inter_node_2.tolist()
        self.reset()
        return out
