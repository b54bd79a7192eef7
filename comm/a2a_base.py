"""The all-to-all interface every backend implements, its dispatch metadata, and the helpers backends share.

Legend: T tokens on this rank, D hidden, K top-k, R ranks (EP world size),
S rows this rank sends, N rows this rank receives.

Semantics (every backend):

* `dispatch` sends each token ONCE per distinct destination rank, not once per
  (token, expert) pair. With each row go the K expert ids and weights of its
  token, rewritten for the receiver: `recv_topk_ids_NK` holds the receiver's
  LOCAL expert slot where that top-k entry lives on the receiver and -1
  elsewhere; `recv_topk_weights_NK` holds the routed weight there and 0
  elsewhere. The receiver runs
  `reference_fused_moe(recv_x_ND, w13, w2, recv_topk_weights_NK, recv_topk_ids_NK)`
  over its own experts (weights applied, summed over its experts).
* `combine` sends one row back per (token, rank) and sums them into out_TD.
* `dispatch_async` / `combine_async` start the same operations and return an
  `A2AHandle`; `handle.wait()` returns what the blocking call returns. Work
  the caller does between the two (the shared experts, the other micro-batch
  of a two-batch-overlap step) overlaps the transfer where the backend can
  overlap (DeepEP's async_finish idea). The base class runs the blocking call
  and returns a handle that is already done, so every backend has both forms;
  "torch", "torch_padded" and "nccl" return transfers really in flight
  (`PendingHandle`). Each handle is waited on exactly once and in issue order
  per all-to-all object (both checked: `IssueOrder`).

Where a (token, expert) pair goes (which rank, which local slot, which replica
of a redundant expert) is the placement's decision, not the backend's:
dispatch asks an `ExpertRoute` (moelink.moe.placement.PlacementTables is the
one the engine uses; the replica rule is documented there). comm names only
the two things it calls because it must not import moe.

This module imports no other comm module, so every backend module can import
it without a cycle; the registry of backends is comm/backends.py.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

import torch


class ExpertRoute(Protocol):
    """What dispatch needs to know about an expert placement: its rank count and where each pair goes."""

    @property
    def ep_size(self) -> int:
        """Ranks the placement is for; must equal the all-to-all's world size."""

    def route(self, topk_ids_TK: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For the tokens of sender `rank`: (dst_rank_TK int64, local_slot_TK int32), each [T, K], on
        topk_ids_TK's device. Must not sync with the host (the padded backends run inside CUDA graphs)."""


@dataclass(eq=False)
class DispatchMeta:
    """What combine needs, what the receiver computes on, and the traffic counters of one dispatch.

    Returned by `dispatch` and passed back to `combine`; backends never keep it.
    The "send buffer" is what this rank sends, one row per (token, destination
    rank); see the backend's layout.

    recv_topk_ids_NK: int32 [N, K], local expert slot on this rank or -1.
    recv_topk_weights_NK: [N, K] in the weights' dtype, 0 where the id is -1.
    num_tokens: T, rows of combine's output.
    send_token_idx_S: int64 [S], source token of each send-buffer row
        (padded backends: T for padding rows).
    send_counts_R / recv_counts_R: int64 device tensors [R], valid rows this
        rank sends to / receives from each rank.
    send_counts / recv_counts: the same as python lists, filled by backends
        that already synced (torch, none); None on the sync-free padded backends.
    row_bytes: D · element size of x; meta_row_bytes: K · (4 + weight element size).
    inter_node_rows: int64 device tensor [R], rows this rank sent across nodes to each rank, counted apart
        from the dispatch rows; set by the node-aware backend ("two_level"), None on one-level backends.
    wire_rows: x rows this rank puts on the wire in this dispatch, padding included, known from
        shapes on the host (fixed-capacity layouts: R · C; exact layouts: the rows sent). combine
        moves as many back.
    mode: the dispatch mode that moved it ("exact", "low_latency", "high_throughput"; comm/ep_modes.py).
    """

    recv_topk_ids_NK: torch.Tensor
    recv_topk_weights_NK: torch.Tensor
    num_tokens: int
    send_token_idx_S: torch.Tensor | None
    send_counts_R: torch.Tensor | None
    recv_counts_R: torch.Tensor | None
    send_counts: list[int] | None
    recv_counts: list[int] | None
    row_bytes: int
    meta_row_bytes: int
    inter_node_rows: torch.Tensor | None = None
    wire_rows: int = 0
    mode: str = "exact"

    def _host_counts(self) -> tuple[list[int], list[int]]:
        if self.send_counts is None or self.recv_counts is None:
            # host sync (padded backends only): read counters after the step, never inside a CUDA graph.
            both = torch.stack([self.send_counts_R, self.recv_counts_R]).tolist()
            self.send_counts, self.recv_counts = both[0], both[1]
        return self.send_counts, self.recv_counts

    @property
    def num_tokens_sent(self) -> int:
        """Rows this rank dispatched: Σ over its tokens of distinct destination ranks (itself included)."""
        return sum(self._host_counts()[0])

    @property
    def num_tokens_received(self) -> int:
        """Valid rows this rank received (and sends back in combine)."""
        return sum(self._host_counts()[1])

    @property
    def bytes_dispatched(self) -> int:
        """Payload bytes (x rows only, padding excluded) this rank sends in dispatch, rows to itself included."""
        return self.num_tokens_sent * self.row_bytes

    @property
    def bytes_combined(self) -> int:
        """Payload bytes this rank sends back in combine (one row per received row, y in x's dtype)."""
        return self.num_tokens_received * self.row_bytes

    @property
    def bytes_metadata(self) -> int:
        """Id and weight bytes sent with the dispatched rows, counted apart from the payload."""
        return self.num_tokens_sent * self.meta_row_bytes

    @property
    def bytes_inter_node(self) -> int:
        """Payload bytes this rank sent across nodes in dispatch (0 on one-level backends)."""
        if self.inter_node_rows is None:
            return 0
        # host sync (read after the step): backends that already hold the counts on the host override this.
        return int(self.inter_node_rows.sum()) * self.row_bytes


class IssueOrder:
    """One all-to-all object's handles in issue order: each is waited on after every handle issued before it.
    (Ranks must issue the same collectives in the same order; waiting in that order too keeps a schedule such as
    two-batch overlap the same on every rank and easy to reason about.)"""

    def __init__(self) -> None:
        self.issued = 0
        self.waited = 0

    def take(self) -> int:
        self.issued += 1
        return self.issued - 1

    def check(self, seq: int) -> None:
        if seq != self.waited:
            raise RuntimeError(f"all-to-all handle #{seq} waited out of order: handle #{self.waited}, issued "
                               "before it on this rank, is not waited on yet (wait handles in issue order).")
        self.waited += 1


class A2AHandle(ABC):
    """An all-to-all in flight: `wait()` returns its result (dispatch: (recv_x_ND, meta); combine: out_TD).

    Waited on exactly once (a second wait raises: the result's buffers may already be reused by the caller),
    and, when its all-to-all tracks the order (`AllToAll._issued`), after every handle issued before it."""

    _waited = False
    _order: IssueOrder | None = None
    _seq = 0

    def wait(self):
        """Block until the transfer is complete (on GPU: make the current stream wait) and return its result."""
        if self._waited:
            raise RuntimeError("all-to-all handle waited on twice: each dispatch/combine handle is waited on once.")
        if self._order is not None:
            self._order.check(self._seq)
        self._waited = True
        return self._finish()

    @abstractmethod
    def _finish(self):
        """The backend's part of `wait`: complete the transfer and build the result (called once)."""


class DoneHandle(A2AHandle):
    """A handle whose transfer already finished (the blocking fallback)."""

    def __init__(self, result):
        self._result = result

    def _finish(self):
        result, self._result = self._result, None
        return result


class PendingHandle(A2AHandle):
    """Collectives in flight: `works` are torch.distributed Work objects (or anything with `wait()`), waited in
    order; then `finish()` builds the result from the received buffers (e.g. unpacks ids and weights). The
    handle holds the send buffers too (`keep`): an async collective reads them until it completes."""

    def __init__(self, works, finish, keep=()):
        self._works, self._then, self._keep = list(works), finish, keep

    def _finish(self):
        for work in self._works:
            work.wait()
        then = self._then
        self._works, self._then, self._keep = [], None, ()
        return then()


class AllToAll(ABC):
    """Dispatch tokens to the ranks that hold their experts and combine the results back.

    One object per process, built once (comm.backends.make_all_to_all, or an
    AllToAllSpec's `build`); `group` is the EP process group (or None at world
    size 1), `rank` this process's rank in it. Every rank must call dispatch
    and combine the same number of times in the same order, also with T = 0
    tokens (x_TD of shape [0, D]).
    """

    name: str = ""
    # Whether dispatch takes ids < 0 (padding rows of a decode graph) and sends them nowhere.
    accepts_padding_rows: bool = False
    # A two-mode backend (comm/ep_modes.py TwoModeAllToAll) only: its low-latency mode (what decode graphs and
    # the per-step plan need) and the mode the step runs in. None on every single-mode backend.
    low_latency: "AllToAll | None" = None
    mode: "AllToAll | None" = None

    def __init__(self, group, rank: int, world_size: int, device: torch.device | str):
        if not 0 <= rank < world_size:
            raise ValueError(f"all-to-all rank must be in [0, {world_size}), got {rank}.")
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self._order = IssueOrder()

    def _issued(self, handle: A2AHandle) -> A2AHandle:
        """Number a handle this object just issued, so that waits follow issue order (A2AHandle.wait)."""
        handle._order, handle._seq = self._order, self._order.take()
        return handle

    @abstractmethod
    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                 route: ExpertRoute) -> tuple[torch.Tensor, DispatchMeta]:
        """Send each token once per destination rank.

        x_TD [T, D] any float dtype; topk_ids_TK [T, K] int logical expert ids;
        topk_weights_TK [T, K] float; `route` says where each (token, expert)
        pair goes (e.g. `ExpertPlacement.to_tensors()`). Returns
        (recv_x_ND [N, D] in x's dtype, meta).
        """

    @abstractmethod
    def combine(self, y_ND: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        """Send y_ND (one row per received row, same order) back; returns out_TD [T, D] in y's dtype,
        each token's rows summed over the ranks that served it."""

    def dispatch_async(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                       route: ExpertRoute, **options) -> A2AHandle:
        """Start `dispatch`; `.wait()` returns (recv_x_ND, meta). Default: the blocking dispatch. `options` go to
        `dispatch` as they are (the fixed-capacity backends take `capacity`, the step's per-rank block)."""
        return self._issued(DoneHandle(self.dispatch(x_TD, topk_ids_TK, topk_weights_TK, route, **options)))

    def combine_async(self, y_ND: torch.Tensor, meta: DispatchMeta) -> A2AHandle:
        """Start `combine`; `.wait()` returns out_TD. Default: the blocking combine."""
        return self._issued(DoneHandle(self.combine(y_ND, meta)))

    def begin_step(self, step) -> None:
        """Called by the runner before each step with the driver's `EPStepPlan` (engine/contract/ep_step.py: the step's
        mode and its largest tokens-per-rank). Backends that size every call from exchanged counts ignore it;
        `TwoModeAllToAll` (comm/ep_modes.py) picks its dispatch mode here."""

    def close(self) -> None:
        """Release communicator resources (no-op for backends that own none)."""


# --- shared by the backends ------------------------------------------------------------------------

def check_inputs(x_TD, topk_ids_TK, topk_weights_TK, route: ExpertRoute, world_size: int) -> None:
    # Shapes are host-known: these checks never sync.
    if x_TD.dim() != 2:
        raise ValueError(f"dispatch x_TD must be 2-D [tokens, hidden], got shape {tuple(x_TD.shape)}.")
    if topk_ids_TK.dim() != 2 or topk_ids_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"dispatch topk_ids_TK must be [{x_TD.shape[0]}, top_k], got {tuple(topk_ids_TK.shape)}.")
    if topk_weights_TK.shape != topk_ids_TK.shape:
        raise ValueError(f"dispatch topk_weights_TK shape {tuple(topk_weights_TK.shape)} must equal "
                         f"topk_ids_TK shape {tuple(topk_ids_TK.shape)}.")
    if route.ep_size != world_size:
        raise ValueError(f"placement tables are for ep_size={route.ep_size}, but the all-to-all group has "
                         f"{world_size} ranks.")


def meta_row_bytes(topk_weights_TK: torch.Tensor) -> int:
    """Bytes of one row's ids (int32) and weights, as they travel packed."""
    return topk_weights_TK.shape[1] * (4 + topk_weights_TK.element_size())


def pack_meta(ids_SK: torch.Tensor, weights_SK: torch.Tensor) -> torch.Tensor:
    """[S, K] int32 ids and [S, K] weights → one uint8 [S, K·(4 + w bytes)] tensor: one collective, any dtypes."""
    return torch.cat([_row_bytes(ids_SK.to(torch.int32)), _row_bytes(weights_SK)], dim=1)


def _row_bytes(t_SK: torch.Tensor) -> torch.Tensor:
    """t's bytes, [S, K * itemsize]. contiguous() keeps a stride that view() refuses where a dim has size 0 or 1 (a
    top-1 rank sending no rows: ids [0, 1] of strides (1, 0), from torch.where); such a tensor is copied row-major."""
    t_SK = t_SK.contiguous()
    if t_SK.stride(-1) != 1:
        t_SK = t_SK.clone(memory_format=torch.contiguous_format)
    return t_SK.view(torch.uint8)


def unpack_meta(packed_NB: torch.Tensor, top_k: int, weight_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `pack_meta`: (ids_NK int32, weights_NK in weight_dtype)."""
    # Always copy: a column slice that happens to be contiguous (one row) may sit at a byte offset that
    # the dtype view rejects, and separate storages keep ids and weights independent.
    fresh = dict(memory_format=torch.contiguous_format)
    ids_NK = packed_NB[:, : 4 * top_k].clone(**fresh).view(torch.int32)
    weights_NK = packed_NB[:, 4 * top_k :].clone(**fresh).view(weight_dtype)
    return ids_NK, weights_NK


__all__ = ["A2AHandle", "AllToAll", "DispatchMeta", "DoneHandle", "IssueOrder", "PendingHandle", "ExpertRoute", "check_inputs", "meta_row_bytes", "pack_meta", "unpack_meta"]
