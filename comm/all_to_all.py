"""All-to-all dispatch and combine for expert parallelism, behind one interface.

Legend: T tokens on this rank, D hidden, K top-k, G logical (global) experts,
X most replicas of one expert, R ranks (EP world size), S rows this rank sends,
N rows this rank receives.

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

Replica choice: a logical expert with c replicas (placement tables, in the
order given there) is served for token t of rank s by replica (t + s) % c.
Deterministic, so EP runs repeat exactly; it spreads a hot expert over its
replicas within a batch, and the `+ s` spreads it across sender ranks even when
every rank has a single decode token.

Buffer layout of the "torch" backend (exact): the send buffer holds rows
grouped by destination rank in rank order, within a rank in token order; S =
Σ send_counts. The receive buffer is the concatenation over source ranks in
rank order of what each sent here, again in the sender's token order; N = Σ
recv_counts. combine returns y_ND in the same row order. The padded backends
(comm/nccl_all_to_all.py) use fixed blocks instead, documented there.

Backends are strategy objects chosen once, by name, with `make_all_to_all`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class PlacementTables:
    """Device tables of an expert placement, what dispatch needs to route a (token, expert) pair.

    Built by `moelink.moe.placement.ExpertPlacement.to_tensors`; it lives here
    because comm must not import moe. All int32 on the dispatch device:
    replica_count_G [G] (>= 1), replica_rank_GX and replica_slot_GX [G, X]
    (the rank and local slot of each replica, -1 beyond the count).
    """

    replica_count_G: torch.Tensor
    replica_rank_GX: torch.Tensor
    replica_slot_GX: torch.Tensor
    ep_size: int

    @property
    def num_experts(self) -> int:
        return int(self.replica_rank_GX.shape[0])

    @property
    def max_replicas(self) -> int:
        return int(self.replica_rank_GX.shape[1])


def select_replicas(topk_ids_TK: torch.Tensor, tables: PlacementTables, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each (token, expert) pair goes: (dst_rank_TK int64, local_slot_TK int32).

    Replica rule (module docstring): replica (t + rank) % count. No host sync.
    """
    ids_TK = topk_ids_TK.long()
    if tables.max_replicas == 1:
        return tables.replica_rank_GX[:, 0].long()[ids_TK], tables.replica_slot_GX[:, 0][ids_TK]
    tok_T = torch.arange(ids_TK.shape[0], device=ids_TK.device)
    rep_TK = (tok_T[:, None] + rank) % tables.replica_count_G.long()[ids_TK]
    return tables.replica_rank_GX.long()[ids_TK, rep_TK], tables.replica_slot_GX[ids_TK, rep_TK]


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


class AllToAll(ABC):
    """Dispatch tokens to the ranks that hold their experts and combine the results back.

    One object per process, built once; `group` is the EP process group (or
    None at world size 1), `rank` this process's rank in it. Every rank must
    call dispatch and combine the same number of times in the same order, also
    with T = 0 tokens (x_TD of shape [0, D]).
    """

    name: str = ""

    def __init__(self, group, rank: int, world_size: int, device: torch.device | str):
        if not 0 <= rank < world_size:
            raise ValueError(f"all-to-all rank must be in [0, {world_size}), got {rank}.")
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)

    @abstractmethod
    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                 placement_tables: PlacementTables) -> tuple[torch.Tensor, DispatchMeta]:
        """Send each token once per destination rank.

        x_TD [T, D] any float dtype; topk_ids_TK [T, K] int logical expert ids;
        topk_weights_TK [T, K] float. Returns (recv_x_ND [N, D] in x's dtype, meta).
        """

    @abstractmethod
    def combine(self, y_ND: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        """Send y_ND (one row per received row, same order) back; returns out_TD [T, D] in y's dtype,
        each token's rows summed over the ranks that served it."""

    def close(self) -> None:
        """Release communicator resources (no-op for backends that own none)."""


def _check_inputs(x_TD, topk_ids_TK, topk_weights_TK, tables: PlacementTables, world_size: int) -> None:
    # Shapes are host-known: these checks never sync.
    if x_TD.dim() != 2:
        raise ValueError(f"dispatch x_TD must be 2-D [tokens, hidden], got shape {tuple(x_TD.shape)}.")
    if topk_ids_TK.dim() != 2 or topk_ids_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"dispatch topk_ids_TK must be [{x_TD.shape[0]}, top_k], got {tuple(topk_ids_TK.shape)}.")
    if topk_weights_TK.shape != topk_ids_TK.shape:
        raise ValueError(f"dispatch topk_weights_TK shape {tuple(topk_weights_TK.shape)} must equal "
                         f"topk_ids_TK shape {tuple(topk_ids_TK.shape)}.")
    if tables.ep_size != world_size:
        raise ValueError(f"placement tables are for ep_size={tables.ep_size}, but the all-to-all group has "
                         f"{world_size} ranks.")


def _meta_row_bytes(topk_weights_TK: torch.Tensor) -> int:
    return topk_weights_TK.shape[1] * (4 + topk_weights_TK.element_size())


class NoAllToAll(AllToAll):
    """World size 1: nothing moves. recv_x is x itself; ids are mapped to local slots."""

    name = "none"

    def __init__(self, group, rank: int, world_size: int, device):
        if world_size != 1:
            raise ValueError(f"all-to-all backend 'none' is for world size 1, got {world_size}: use 'torch' or 'nccl'.")
        super().__init__(group, rank, world_size, device)

    def dispatch(self, x_TD, topk_ids_TK, topk_weights_TK, placement_tables):
        _check_inputs(x_TD, topk_ids_TK, topk_weights_TK, placement_tables, self.world_size)
        # One rank holds every expert exactly once (a rank never holds two replicas), so column 0 is the map.
        slot_TK = placement_tables.replica_slot_GX[:, 0][topk_ids_TK.long()]
        num_tokens = x_TD.shape[0]
        counts_R = torch.full((1,), num_tokens, dtype=torch.int64, device=x_TD.device)
        meta = DispatchMeta(
            recv_topk_ids_NK=slot_TK, recv_topk_weights_NK=topk_weights_TK, num_tokens=num_tokens,
            send_token_idx_S=None, send_counts_R=counts_R, recv_counts_R=counts_R,
            send_counts=[num_tokens], recv_counts=[num_tokens],
            row_bytes=x_TD.shape[1] * x_TD.element_size(), meta_row_bytes=_meta_row_bytes(topk_weights_TK))
        return x_TD, meta

    def combine(self, y_ND, meta):
        if y_ND.shape[0] != meta.num_tokens:
            raise ValueError(f"combine got {y_ND.shape[0]} rows, dispatch produced {meta.num_tokens}.")
        return y_ND


def _pack_meta(ids_SK: torch.Tensor, weights_SK: torch.Tensor) -> torch.Tensor:
    """[S, K] int32 ids and [S, K] weights → one uint8 [S, K·(4 + w bytes)] tensor: one collective, any dtypes."""
    return torch.cat([ids_SK.to(torch.int32).contiguous().view(torch.uint8),
                      weights_SK.contiguous().view(torch.uint8)], dim=1)


def _unpack_meta(packed_NB: torch.Tensor, top_k: int, weight_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Always copy: a column slice that happens to be contiguous (one row) may sit at a byte offset that
    # the dtype view rejects, and separate storages keep ids and weights independent.
    fresh = dict(memory_format=torch.contiguous_format)
    ids_NK = packed_NB[:, : 4 * top_k].clone(**fresh).view(torch.int32)
    weights_NK = packed_NB[:, 4 * top_k :].clone(**fresh).view(weight_dtype)
    return ids_NK, weights_NK


class TorchAllToAll(AllToAll):
    """torch.distributed `all_to_all_single` with exact (uneven) splits; gloo on CPU, NCCL on GPU.

    Per dispatch: one collective for the counts (then THE one host sync, to size
    the buffers), one for the x rows, one for ids+weights packed as bytes.
    Per combine: one collective, no sync. gloo supports uneven splits (checked
    on torch 2.13, bf16 included), so no fallback path is needed. Not CUDA-graph
    safe (the counts sync); the padded backends are.
    """

    name = "torch"

    def __init__(self, group, rank: int, world_size: int, device):
        if group is None:
            raise ValueError("all-to-all backend 'torch' needs a process group (comm.init_process_group).")
        super().__init__(group, rank, world_size, device)

    def dispatch(self, x_TD, topk_ids_TK, topk_weights_TK, placement_tables):
        _check_inputs(x_TD, topk_ids_TK, topk_weights_TK, placement_tables, self.world_size)
        num_tokens, hidden = x_TD.shape
        top_k = topk_ids_TK.shape[1]
        R, dev = self.world_size, x_TD.device
        dst_TK, slot_TK = select_replicas(topk_ids_TK, placement_tables, self.rank)
        to_rank_TR = torch.zeros(num_tokens, R, dtype=torch.bool, device=dev).scatter_(1, dst_TK, True)
        send_counts_R = to_rank_TR.sum(0)
        recv_counts_R = torch.empty_like(send_counts_R)
        dist.all_to_all_single(recv_counts_R, send_counts_R, group=self.group)
        # host sync: the one per dispatch; the split sizes must be on the host.
        counts = torch.cat([send_counts_R, recv_counts_R]).tolist()
        send_counts, recv_counts = counts[:R], counts[R:]
        num_send, num_recv = sum(send_counts), sum(recv_counts)

        # Rows in (destination rank, token) order: nonzero over the rank-major mask.
        rank_tok_S2 = torch.nonzero_static(to_rank_TR.T, size=num_send)
        send_rank_S, send_tok_S = rank_tok_S2[:, 0], rank_tok_S2[:, 1]
        send_x_SD = x_TD.index_select(0, send_tok_S)
        here_SK = dst_TK.index_select(0, send_tok_S) == send_rank_S[:, None]
        send_ids_SK = torch.where(here_SK, slot_TK.index_select(0, send_tok_S).to(torch.int32), -1)
        weights_SK = topk_weights_TK.index_select(0, send_tok_S)
        send_weights_SK = torch.where(here_SK, weights_SK, torch.zeros_like(weights_SK))

        recv_x_ND = x_TD.new_empty(num_recv, hidden)
        dist.all_to_all_single(recv_x_ND, send_x_SD, recv_counts, send_counts, group=self.group)
        send_meta_SB = _pack_meta(send_ids_SK, send_weights_SK)
        recv_meta_NB = send_meta_SB.new_empty(num_recv, send_meta_SB.shape[1])
        dist.all_to_all_single(recv_meta_NB, send_meta_SB, recv_counts, send_counts, group=self.group)
        recv_ids_NK, recv_weights_NK = _unpack_meta(recv_meta_NB, top_k, topk_weights_TK.dtype)
        meta = DispatchMeta(
            recv_topk_ids_NK=recv_ids_NK, recv_topk_weights_NK=recv_weights_NK, num_tokens=num_tokens,
            send_token_idx_S=send_tok_S, send_counts_R=send_counts_R, recv_counts_R=recv_counts_R,
            send_counts=send_counts, recv_counts=recv_counts,
            row_bytes=hidden * x_TD.element_size(), meta_row_bytes=_meta_row_bytes(topk_weights_TK))
        return recv_x_ND, meta

    def combine(self, y_ND, meta):
        num_recv = sum(meta.recv_counts)
        if y_ND.dim() != 2 or y_ND.shape[0] != num_recv:
            raise ValueError(f"combine y_ND must have {num_recv} rows (one per received row), got {tuple(y_ND.shape)}.")
        back_SD = y_ND.new_empty(meta.send_token_idx_S.shape[0], y_ND.shape[1])
        dist.all_to_all_single(back_SD, y_ND.contiguous(), meta.send_counts, meta.recv_counts, group=self.group)
        # index_add_ sums a token's rows in rank order: deterministic on CPU; on CUDA it uses atomics
        # unless torch.use_deterministic_algorithms(True).
        out_TD = y_ND.new_zeros(meta.num_tokens, y_ND.shape[1])
        return out_TD.index_add_(0, meta.send_token_idx_S, back_SD)


def _make_padded(group, rank, world_size, device, **options):
    from .nccl_all_to_all import PaddedAllToAll

    return PaddedAllToAll(group, rank, world_size, device, **options)


def _make_nccl(group, rank, world_size, device, **options):
    from .nccl_all_to_all import NcclAllToAll  # lazy: GPU-only, loads libnccl

    return NcclAllToAll(group, rank, world_size, device, **options)


_BACKENDS = {
    "none": NoAllToAll,
    "torch": TorchAllToAll,
    "torch_padded": _make_padded,
    "nccl": _make_nccl,
}


def make_all_to_all(name: str, group, rank: int, world_size: int, device: torch.device | str, **options) -> AllToAll:
    """Build the all-to-all strategy `name`, once per process.

    Names: "none" (world size 1), "torch" (all_to_all_single, exact splits, one
    host sync per dispatch), "torch_padded" (fixed-capacity layout over
    all_to_all_single, no host sync; option max_tokens_per_rank), "nccl"
    (fixed-capacity layout over direct NCCL send/recv, CUDA only, CUDA-graph
    safe; option max_tokens_per_rank), "auto" ("none" at world size 1, else "torch").
    """
    if name == "auto":
        name = "none" if world_size == 1 else "torch"
    if name not in _BACKENDS:
        raise ValueError(f"all-to-all backend {name!r} is not known: choose from {sorted(_BACKENDS) + ['auto']}.")
    return _BACKENDS[name](group, rank, world_size, device, **options)


__all__ = ["AllToAll", "DispatchMeta", "NoAllToAll", "PlacementTables", "TorchAllToAll", "make_all_to_all",
           "select_replicas"]
