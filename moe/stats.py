"""Expert-load and all-to-all counters, collected per step and per MoE layer.

Legend: L MoE layers, G logical experts.

Token counts and all-to-all counters (rows sent, rows received, wire rows, and
their bytes) accumulate as device tensors and are read back once per step, after
it (one host sync, in `snapshot`): the MoE layer never reads a count on the host,
so the sync-free backends stay sync-free and a CUDA graph replays the counting
too. Times are host wall-clock seconds (CPU only).
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
    rows_received: int = 0  # valid rows received (and sent back by combine)
    wire_rows: int = 0  # x rows put on the wire by dispatch, padding included (combine moves as many back)
    wire_bytes: int = 0  # those rows' bytes
    ep_mode: str = ""  # the step's dispatch mode (comm/ep_modes.py), set by the runner; "" without EP
    # Per MoE layer: (token, expert) pairs this rank's experts computed (received, valid); empty without EP.
    pairs_computed_per_layer: list[int] = field(default_factory=list)


class MoEStats:
    """Shared by the MoE layers of one model; reset by the runner each step."""

    def __init__(self, num_moe_layers: int, num_experts: int, device: torch.device):
        self.counts_LG = torch.zeros(num_moe_layers, num_experts, dtype=torch.int64, device=device)
        self.num_experts = num_experts
        # Per MoE layer, int64 on the device: columns _SENT .. _WIRE_BYTES (below).
        self.xfer_LC = torch.zeros(num_moe_layers, _COLUMNS, dtype=torch.int64, device=device)
        self._times = [0.0, 0.0, 0.0]
        # Host timers are only honest where ops run synchronously (CPU); on a GPU
        # they would time kernel launches, so they stay off there.
        self.time_phases = device.type == "cpu"

    def record_routing(self, layer: int, topk_ids_TK: torch.Tensor) -> None:
        if topk_ids_TK.numel():
            # index_add_, not bincount: bincount sizes its output from the data, a host sync on
            # CUDA that would also break CUDA-graph capture. Ids < 0 (padding rows of a decode
            # graph) route nowhere and count for nothing.
            ids = topk_ids_TK.reshape(-1)
            routed = (ids >= 0).to(self.counts_LG.dtype)
            self.counts_LG[layer].index_add_(0, ids.clamp(min=0), routed)

    def record_transfer(self, layer: int, meta) -> None:
        """Add one dispatch's counters (a comm DispatchMeta) on the device: no host sync, graph-capturable."""
        sent, recv = meta.send_counts_R.sum(), meta.recv_counts_R.sum()
        rb = meta.row_bytes
        row_C = torch.stack([sent, recv, sent * rb, recv * rb]).to(self.xfer_LC.dtype)
        self.xfer_LC[layer, :_WIRE] += row_C
        # Host-known from shapes; added on the device so a replayed graph adds it too.
        self.xfer_LC[layer, _WIRE] += meta.wire_rows
        self.xfer_LC[layer, _WIRE_BYTES] += meta.wire_rows * rb
        # The pairs this rank's experts compute: its measured expert load (what online EPLB balances).
        ids_NK = getattr(meta, "recv_topk_ids_NK", None)
        if ids_NK is not None:
            self.xfer_LC[layer, _PAIRS] += (ids_NK >= 0).sum().to(self.xfer_LC.dtype)
        if getattr(meta, "inter_node_rows", None) is not None:  # the node-aware backend ("two_level") only
            self.record_inter_node(meta.inter_node_rows, rb, layer)

    def record_inter_node(self, rows_R: torch.Tensor, row_bytes: int, layer: int = 0) -> None:
        """Add one dispatch's rows sent across nodes (int64 device tensor [R], `DispatchMeta.inter_node_rows`),
        in the same device table as the other counters: read with them, no second sync."""
        rows = rows_R.sum().to(self.xfer_LC.dtype)
        self.xfer_LC[layer, _INTER] += rows
        self.xfer_LC[layer, _INTER_BYTES] += rows * row_bytes

    def clock(self) -> float:
        return time.perf_counter() if self.time_phases else 0.0

    def add_times(self, dispatch_s: float, compute_s: float, combine_s: float) -> None:
        self._times[0] += dispatch_s
        self._times[1] += compute_s
        self._times[2] += combine_s

    def reset(self) -> None:
        """Drop what was counted so far (warm-up and capture runs are not traffic)."""
        self.counts_LG.zero_()
        self.xfer_LC.zero_()
        self._times = [0.0, 0.0, 0.0]

    def snapshot(self) -> MoEStepStats:
        """Read this step's counters (host sync) and reset them."""
        return self.take()()

    def take(self):
        """This step's counters, reset on the device, and a function that reads them: the copy to (pinned) host
        memory is enqueued now, in stream order, and read when the function is called after the step's work
        was waited for, so an overlapped loop never waits here for the step after."""
        # One small copy per step, expert counts and transfer counters together; an array, not nested lists,
        # so summing it on the driver and shipping it through Ray stay cheap at L x G = 58 x 256.
        both = torch.cat([self.counts_LG, self.xfer_LC], 1)
        if both.device.type != "cpu":
            host = torch.empty(both.shape, dtype=both.dtype, pin_memory=True)
            host.copy_(both, non_blocking=True)
            both = host
        times = list(self._times)
        self.reset()
        return lambda: self._read(both.numpy(), times)  # host sync where read: after the step's event

    def _read(self, both: np.ndarray, times: list[float]) -> MoEStepStats:
        G = self.num_experts
        counts, xfer = both[:, :G].copy(), both[:, G:].sum(0)
        return MoEStepStats(counts, int(xfer[_SENT_BYTES]), int(xfer[_RECV_BYTES]), int(xfer[_SENT]), *times,
                            [int(b) for b in both[:, G + _SENT_BYTES]], rows_received=int(xfer[_RECV]),
                            wire_rows=int(xfer[_WIRE]), wire_bytes=int(xfer[_WIRE_BYTES]),
                            inter_node_rows=int(xfer[_INTER]), bytes_inter_node=int(xfer[_INTER_BYTES]),
                            pairs_computed_per_layer=[int(n) for n in both[:, G + _PAIRS]])


# Columns of MoEStats.xfer_LC: rows sent, rows received, their payload bytes, wire rows and wire bytes, and
# the rows (and bytes) sent across nodes (node-aware backend only), and the (token, expert) pairs computed here.
_SENT, _RECV, _SENT_BYTES, _RECV_BYTES, _WIRE, _WIRE_BYTES, _INTER, _INTER_BYTES, _PAIRS = range(9)
_COLUMNS = 9
