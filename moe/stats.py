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
from dataclasses import dataclass, field, fields

import numpy as np
import torch


# How a counter combines across ranks in one step: summed, or the slowest rank's (times: ranks step together).
SUM, SLOWEST, PER_STEP = "sum", "slowest", "per_step"


def _counter(kind: str, default=0):
    if callable(default):
        return field(default_factory=default, metadata={"combine": kind})
    return field(default=default, metadata={"combine": kind})


@dataclass
class MoECounters:
    """The MoE counters, one schema for every place that holds them: one rank's step (read back by
    `MoEStats.take`, reported in StepStats.moe) and the engine's totals since start (engine/core/moe_metrics.py
    `MoEMetrics`, a subclass). A new counter is one field here; its `combine` says how ranks' values add up:
    SUM (counts, bytes), SLOWEST (host times) or PER_STEP (kept per step, not totalled)."""

    tokens_per_expert: np.ndarray  # int64 [L, G]: (token, expert) pairs routed from this rank's tokens
    bytes_dispatched: int = _counter(SUM)
    bytes_combined: int = _counter(SUM)
    tokens_dispatched: int = _counter(SUM)  # rows sent (one per token and destination rank)
    dispatch_s: float = _counter(SLOWEST, 0.0)
    compute_s: float = _counter(SLOWEST, 0.0)
    combine_s: float = _counter(SLOWEST, 0.0)
    # Node-aware all-to-all only ("two_level"): rows and payload bytes this rank sent across nodes.
    inter_node_rows: int = _counter(SUM)
    bytes_inter_node: int = _counter(SUM)
    rows_received: int = _counter(SUM)  # valid rows received (and sent back by combine)
    wire_rows: int = _counter(SUM)  # x rows put on the wire by dispatch, padding included (combine moves as many back)
    wire_bytes: int = _counter(SUM)  # those rows' bytes
    per_layer_bytes: list[int] = _counter(PER_STEP, list)
    ep_mode: str = _counter(PER_STEP, "")  # the step's dispatch mode (comm/ep_modes.py), set by the runner; "" without EP
    # Per MoE layer: (token, expert) pairs this rank's experts computed (received, valid); empty without EP.
    pairs_computed_per_layer: list[int] = _counter(PER_STEP, list)

    def add_ranks(self, per_rank: "list[MoECounters]") -> None:
        """Add one step of several ranks: SUM counters and the expert counts summed, SLOWEST ones the maximum."""
        for f in fields(MoECounters):
            kind = f.metadata.get("combine")
            if kind == SUM:
                setattr(self, f.name, getattr(self, f.name) + sum(getattr(s, f.name) for s in per_rank))
            elif kind == SLOWEST:
                setattr(self, f.name, getattr(self, f.name) + max(getattr(s, f.name) for s in per_rank))
        for s in per_rank:
            self.tokens_per_expert += s.tokens_per_expert


def merge_counters(per_rank: "list[MoECounters]") -> "MoECounters":
    """One step of several ranks as one rank's counters (a TP group, whose ranks each routed and dispatched a slice
    of the group's tokens): SUM counters and expert counts summed, SLOWEST the maximum, per-layer lists summed
    layer by layer, the dispatch mode the first rank's."""
    first = per_rank[0]
    out = MoECounters(tokens_per_expert=sum(s.tokens_per_expert for s in per_rank))
    for f in fields(MoECounters):
        kind = f.metadata.get("combine")
        vals = [getattr(s, f.name) for s in per_rank]
        if kind == SUM:
            setattr(out, f.name, sum(vals))
        elif kind == SLOWEST:
            setattr(out, f.name, max(vals))
        elif kind == PER_STEP and isinstance(getattr(first, f.name), list):
            setattr(out, f.name, [sum(x) for x in zip(*vals)] if all(len(v) == len(vals[0]) for v in vals) else vals[0])
        elif kind == PER_STEP:
            setattr(out, f.name, getattr(first, f.name))
    return out


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

    def routing_counts(self, layer: int) -> torch.Tensor:
        """The expert-load counts of MoE layer `layer` (int64 [G], a view): the fused router op adds each
        (token, expert) pair it routes here, as `record_routing` does (kernels/router_topk.py)."""
        return self.counts_LG[layer]

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
        self.xfer_LC[layer, _PAIRS] += (meta.recv_topk_ids_NK >= 0).sum().to(self.xfer_LC.dtype)
        if meta.inter_node_rows is not None:  # the node-aware backend ("two_level") only
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

    def snapshot(self) -> MoECounters:
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

    def _read(self, both: np.ndarray, times: list[float]) -> MoECounters:
        G = self.num_experts
        counts, xfer = both[:, :G].copy(), both[:, G:].sum(0)
        dispatch_s, compute_s, combine_s = times
        return MoECounters(counts, bytes_dispatched=int(xfer[_SENT_BYTES]), bytes_combined=int(xfer[_RECV_BYTES]),
                           tokens_dispatched=int(xfer[_SENT]), dispatch_s=dispatch_s, compute_s=compute_s,
                           combine_s=combine_s, per_layer_bytes=[int(b) for b in both[:, G + _SENT_BYTES]],
                           rows_received=int(xfer[_RECV]), wire_rows=int(xfer[_WIRE]),
                           wire_bytes=int(xfer[_WIRE_BYTES]), inter_node_rows=int(xfer[_INTER]),
                           bytes_inter_node=int(xfer[_INTER_BYTES]),
                           pairs_computed_per_layer=[int(n) for n in both[:, G + _PAIRS]])


# Columns of MoEStats.xfer_LC: rows sent, rows received, their payload bytes, wire rows and wire bytes, and
# the rows (and bytes) sent across nodes (node-aware backend only), and the (token, expert) pairs computed here.
_SENT, _RECV, _SENT_BYTES, _RECV_BYTES, _WIRE, _WIRE_BYTES, _INTER, _INTER_BYTES, _PAIRS = range(9)
_COLUMNS = 9
