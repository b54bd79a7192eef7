"""Two dispatch modes over one fixed-capacity transport, picked per step: low-latency and high-throughput.

Legend as in a2a_base.py; C the per-(source, destination) block of a dispatch, in rows.

A fixed-capacity transport (comm/nccl_all_to_all.py: "torch_padded", "nccl")
moves R blocks of C rows each way and never asks the host how many rows are
real. What C should be depends on the step, and only the driver sees every
rank's step, so the driver decides once per step (engine/contract/ep_step.py) and each
rank's `TwoModeAllToAll.begin_step` picks the matching strategy object:

* `LowLatencyMode` (decode-only steps): C = the decode capacity
  (`--ep-decode-capacity`, default max_num_seqs), the same every step, so the
  buffers keep one shape and a CUDA graph can capture dispatch and combine; no
  counts are exchanged at all.
* `HighThroughputMode` (prefill and mixed steps, and decode steps with more
  tokens on some rank than the decode capacity): C = the step's largest
  tokens-per-rank, which the driver sends with each rank's SchedulerOutput: the
  counts are exchanged once per step (by the driver), not per layer, and no
  dispatch syncs with the host either.

Both modes are exact: a token goes to a rank at most once, so no block ever
holds more than T <= C rows, and a dispatch with T > C is refused (never cut).
Wire rows per dispatch per rank are R · C in both; `dispatch_wire_bytes` is the
one formula of payload and wire bytes per mode, read by the engine's counters
and by the cluster model (planner/).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .a2a_base import A2AHandle, AllToAll, DispatchMeta

if TYPE_CHECKING:
    from .nccl_all_to_all import PaddedAllToAll  # the fixed-capacity transports (NcclAllToAll is one)

LOW_LATENCY = "low_latency"
HIGH_THROUGHPUT = "high_throughput"
EXACT = "exact"  # the counted backends ("torch", "none"): rows sized by a counts exchange per dispatch
MODES = (LOW_LATENCY, HIGH_THROUGHPUT)


class DispatchMode(AllToAll):
    """A fixed-capacity transport run at one capacity: what one step's MoE layers dispatch through.

    Forwards dispatch, combine and their async forms to the transport, with
    `capacity` on every dispatch; the metadata it returns names the mode.
    """

    name = ""
    graph_safe = False
    accepts_padding_rows = True

    def __init__(self, transport: PaddedAllToAll, capacity: int):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"{self.name} dispatch capacity must be a positive integer, got {capacity!r}.")
        super().__init__(transport.group, transport.rank, transport.world_size, transport.device)
        self.transport = transport
        self.capacity = capacity

    def _check(self, x_TD) -> None:
        if x_TD.shape[0] > self.capacity:  # a host-known shape: no sync
            raise ValueError(f"{self.name} dispatch got {x_TD.shape[0]} tokens, above this step's per-rank "
                             f"capacity {self.capacity}: the step plan must size the step (engine/contract/ep_step.py).")

    def _named(self, result):
        recv_x_ND, meta = result
        meta.mode = self.name
        return recv_x_ND, meta

    def dispatch(self, x_TD, topk_ids_TK, topk_weights_TK, route, **options):
        self._check(x_TD)
        return self._named(self.transport.dispatch(x_TD, topk_ids_TK, topk_weights_TK, route, capacity=self.capacity))

    def dispatch_async(self, x_TD, topk_ids_TK, topk_weights_TK, route, **options) -> A2AHandle:
        self._check(x_TD)
        return _NamedHandle(self.transport.dispatch_async(x_TD, topk_ids_TK, topk_weights_TK, route,
                                                          capacity=self.capacity), self.name)

    def combine(self, y_ND, meta: DispatchMeta):
        return self.transport.combine(y_ND, meta)

    def combine_async(self, y_ND, meta: DispatchMeta) -> A2AHandle:
        return self.transport.combine_async(y_ND, meta)


class _NamedHandle(A2AHandle):
    """A dispatch handle whose result's metadata gets the mode's name once it is waited on."""

    def __init__(self, inner: A2AHandle, mode: str):
        self._inner, self._mode = inner, mode

    def _finish(self):
        # (the transport's own handle checks the issue order)
        recv_x_ND, meta = self._inner.wait()
        meta.mode = self._mode
        return recv_x_ND, meta


class LowLatencyMode(DispatchMode):
    """Decode steps: the fixed decode capacity, one buffer shape every step (CUDA-graph safe)."""

    name = LOW_LATENCY
    graph_safe = True


class HighThroughputMode(DispatchMode):
    """Prefill and mixed steps: blocks as large as the step's largest tokens-per-rank, no larger."""

    name = HIGH_THROUGHPUT


class TwoModeAllToAll(AllToAll):
    """The all-to-all a rank's MoE layers hold when the backend has fixed-capacity buffers.

    `begin_step(step)` (the runner calls it before each step with the driver's
    `EPStepPlan`: `.mode` and `.max_tokens_per_rank`) picks the mode object;
    dispatch / combine (blocking and async) go to it. Before any step plan, and
    for a step without one (a layer driven by hand, the warm-up), the
    high-throughput mode runs at the transport's built capacity, which is what
    the backend did on its own.
    """

    def __init__(self, transport: PaddedAllToAll, decode_capacity: int):
        super().__init__(transport.group, transport.rank, transport.world_size, transport.device)
        self.transport = transport
        self.name = transport.name
        self.accepts_padding_rows = transport.accepts_padding_rows
        self.low_latency = LowLatencyMode(transport, decode_capacity)
        self.mode: DispatchMode = HighThroughputMode(transport, transport.capacity)

    @property
    def decode_capacity(self) -> int:
        return self.low_latency.capacity

    def begin_step(self, step) -> None:
        if step is None:  # a step nobody planned: the backend's own behaviour, never a stale mode
            self.mode = HighThroughputMode(self.transport, self.transport.capacity)
            return
        if step.mode == LOW_LATENCY:
            if step.max_tokens_per_rank > self.decode_capacity:
                raise ValueError(f"a low-latency step carries {step.max_tokens_per_rank} tokens on a rank, above "
                                 f"the decode capacity {self.decode_capacity}: it must run high-throughput.")
            self.mode = self.low_latency
        elif step.mode == HIGH_THROUGHPUT:
            # An empty step on every rank still never has C = 0: blocks of one row.
            self.mode = HighThroughputMode(self.transport, max(1, step.max_tokens_per_rank))
        else:
            raise ValueError(f"EP step mode {step.mode!r} is invalid: choose from {', '.join(MODES)}.")

    def dispatch(self, x_TD, topk_ids_TK, topk_weights_TK, route, **options):
        return self.mode.dispatch(x_TD, topk_ids_TK, topk_weights_TK, route)

    def dispatch_async(self, x_TD, topk_ids_TK, topk_weights_TK, route, **options) -> A2AHandle:
        return self.mode.dispatch_async(x_TD, topk_ids_TK, topk_weights_TK, route)

    def combine(self, y_ND, meta):
        return self.mode.combine(y_ND, meta)

    def combine_async(self, y_ND, meta) -> A2AHandle:
        return self.mode.combine_async(y_ND, meta)

    def close(self) -> None:
        self.transport.close()


@dataclass(frozen=True)
class DispatchBytes:
    """Bytes one rank puts on the wire in one dispatch (combine moves the same x rows back).

    payload: x rows of tokens, once per (token, destination rank), rows to itself included.
    wire: x rows as they travel, padding included. metadata: ids + weights of the wire rows.
    """

    payload: float
    wire: float
    metadata: float


def dispatch_wire_bytes(mode: str, *, world_size: int, tokens: float, distinct_ranks_per_token: float,
                        row_bytes: int, meta_row_bytes: int = 0, capacity: int | None = None) -> DispatchBytes:
    """The one formula of what a dispatch moves per rank, per mode (the engine's counters measure the same).

    tokens: T on this rank; distinct_ranks_per_token: the mean number of distinct
    destination ranks of a token (itself included); capacity: C of a fixed-
    capacity mode (low-latency: the decode capacity; high-throughput: the step's
    largest tokens-per-rank; default T, every rank equally loaded). exact: the
    counted backends, whose wire carries only real rows.
    """
    if mode not in (*MODES, EXACT):
        raise ValueError(f"dispatch mode {mode!r} is invalid: choose from {', '.join((*MODES, EXACT))}.")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size!r}.")
    rows = tokens * distinct_ranks_per_token
    if mode == EXACT:
        wire_rows = rows
    else:
        cap = tokens if capacity is None else capacity
        if cap < tokens:
            raise ValueError(f"{mode} capacity {cap} is below the {tokens} tokens of the rank: a step that does "
                             "not fit runs high-throughput at its own size.")
        wire_rows = world_size * cap
    return DispatchBytes(rows * row_bytes, wire_rows * row_bytes, wire_rows * meta_row_bytes)


__all__ = ["DispatchBytes", "DispatchMode", "EXACT", "HIGH_THROUGHPUT", "HighThroughputMode", "LOW_LATENCY",
           "LowLatencyMode", "MODES", "TwoModeAllToAll", "dispatch_wire_bytes"]
