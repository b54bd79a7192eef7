"""Node-aware two-level all-to-all ("two_level"): one network crossing per destination node, NVLink fan-out inside.

Legend: T tokens on this rank, D hidden, K top-k, R ranks (EP world size), M
nodes (NVLink domains), S1 rows this rank sends over the network (stage 1), F
rows this rank forwards inside its node (F = T + rows it received in stage 1),
S2 rows it sends in stage 2, N rows it receives (what its experts run on),
C = R + 2 columns of the counts exchange. The interface, its semantics and
`DispatchMeta` are in comm/a2a_base.py.

Why: with one row per (token, destination rank), a token whose experts sit on
three ranks of one remote node crosses the network three times. Here it
crosses once per destination NODE and the copies are made over NVLink on the
far side (DeepEP's internode "normal" kernels; the cluster model in
comm/link_model.py prices the saving).

Rail alignment. Rank s reaches node n through one "gateway", the rank of n
with the same local index as s (local index = position of s among its node's
ranks, in rank order), modulo n's size when nodes differ in size. Each NIC
then talks to its peer NIC of the same rail, as DeepEP arranges it.

Dispatch, on rank s:
1. counts (one collective, equal splits of C int64 per rank): to each rank g,
   [stage-1 rows s sends to g, logical rows s delivers to g, then for every
   rank r the rows s will make g forward to r (non-zero only where g forwards
   for s: g is s's gateway to g's node, or g = s for s's own node)]; g sums the
   last R columns over senders to get its stage-2 send counts, and one more
   collective of R counts gives every rank its stage-2 receive counts. Then
   THE one host sync of the dispatch reads every split.
2. stage 1 (network): rows in (gateway rank, token) order, one per (token,
   remote destination node); with each row go its K destination ranks (-1 for
   entries outside that node), local slots and weights. Rows to the sender's
   own node skip this stage. Only pairs of ranks in different nodes have
   non-zero splits (exact uneven splits over the EP group).
3. stage 2 (NVLink): every rank forwards its own tokens (entries in its node)
   and the rows it received in stage 1, one row per (forwarded row,
   destination rank), in (destination rank, forwarded row) order; ids become
   the receiver's local slots (-1 elsewhere, weights 0 there), exactly as the
   one-level backends deliver them. Only pairs in one node are non-zero.
The receive buffer is the concatenation over forwarding ranks in rank order.

Combine mirrors it: stage-2 rows go back to their forwarder, which sums them
into one partial row per forwarded row (the reduction inside the destination
node); the partial rows of stage-1 rows cross the network back, one per
(token, node); the sender adds its own node's partials and the returned rows
into out_TD. Summation order is fixed by the layout (index_add_ over rows in
buffer order: deterministic on CPU; on CUDA it uses atomics unless
torch.use_deterministic_algorithms(True), as the "torch" backend).

One node (every rank in one NVLink domain): stage 1 carries nothing and is
skipped by every rank (all know the map), and stage 2 is exactly the "torch"
backend's one-level exchange: the same rows in the same order, same counters.

Both stages use the EP group with zero splits where a pair does not talk;
a deployment that wants the network hop on its own communicator can give
this class a group per stage later without changing the layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .a2a_base import AllToAll, DispatchMeta, check_inputs, meta_row_bytes, pack_meta, unpack_meta


def check_node_of_rank(node_of_rank, world_size: int, name: str = "node_of_rank") -> tuple[int, ...]:
    """Validated node map: one integer >= 0 per rank (ranks with equal numbers share an NVLink domain).
    `name` is the field the user set, for the error message."""
    if not isinstance(node_of_rank, (list, tuple)):
        raise ValueError(f"{name} must be a list of {world_size} node numbers (one per rank), got {node_of_rank!r}.")
    if len(node_of_rank) != world_size:
        raise ValueError(f"{name} must have one entry per rank ({world_size}), got {len(node_of_rank)}: "
                         f"{list(node_of_rank)!r}.")
    for r, n in enumerate(node_of_rank):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name}[{r}]={n!r} is invalid: node numbers must be integers >= 0.")
    return tuple(node_of_rank)


def node_numbers(node_ids) -> tuple[int, ...]:
    """Any per-rank node labels (Ray node ids are hex strings) → node numbers 0, 1, ... in first-seen order."""
    dense: dict = {}
    return tuple(dense.setdefault(n, len(dense)) for n in node_ids)


@dataclass(eq=False)
class TwoLevelMeta(DispatchMeta):
    """DispatchMeta plus the two stages' layout, for combine.

    send_token_idx_S is the source token of each stage-1 (network) row;
    send_counts / send_counts_R are the logical rows per destination rank (Σ
    over tokens of distinct destination ranks, as every backend counts them),
    recv_counts / recv_counts_R the rows received per ORIGIN rank (whichever
    rank forwarded them). inter_node_rows: int64 [R] stage-1 rows sent to each
    rank (non-zero only at this rank's gateways in other nodes).
    """

    stage1_send: list[int] | None = None  # rows to each rank in stage 1
    stage1_recv: list[int] | None = None
    stage2_send: list[int] | None = None
    stage2_recv: list[int] | None = None
    stage2_fwd_idx_S: torch.Tensor | None = None  # int64 [S2]: forwarded row (0..F-1) of each stage-2 row

    @property
    def bytes_inter_node(self) -> int:
        """Payload bytes this rank sent across nodes in dispatch (combine returns as many rows)."""
        return sum(self.stage1_send) * self.row_bytes


class TwoLevelAllToAll(AllToAll):
    """The two-level exchange of the module docstring, over torch.distributed `all_to_all_single`.

    Option `node_of_rank`: list of R integers >= 0, the node (NVLink domain) of
    each rank; nodes may differ in size and need not be numbered 0..M-1. With
    one node it behaves exactly like the "torch" backend. One host sync per
    dispatch (the splits), none in combine; not CUDA-graph safe.
    """

    name = "two_level"

    def __init__(self, group, rank: int, world_size: int, device, node_of_rank):
        nodes = check_node_of_rank(node_of_rank, world_size)
        if group is None and world_size > 1:
            raise ValueError("all-to-all backend 'two_level' needs a process group (comm.init_process_group).")
        super().__init__(group, rank, world_size, device)
        self.node_of_rank = nodes
        dense = {n: i for i, n in enumerate(dict.fromkeys(nodes))}  # node numbers → 0..M-1, first-seen order
        node_R = [dense[n] for n in nodes]
        self.num_nodes = len(dense)
        members = [[r for r in range(world_size) if node_R[r] == m] for m in range(self.num_nodes)]
        me_node, me_local = node_R[rank], members[node_R[rank]].index(rank)
        # This rank's gateway into each node: the same rail (local index), wrapped for smaller nodes;
        # its own node needs none (rows there skip the network).
        gateway_M = [members[m][me_local % len(members[m])] for m in range(self.num_nodes)]
        gateway_M[me_node] = rank
        forwards_for_me_R = [gateway_M[node_R[g]] == g for g in range(world_size)]
        dev = self.device
        self.my_node = me_node
        self._node_R = torch.tensor(node_R, dtype=torch.long, device=dev)
        same_node_RR = self._node_R[:, None] == self._node_R[None, :]
        # [g, r]: rows to r are forwarded by g (g is this rank's forwarder for r's node).
        self._forward_via_RR = same_node_RR & torch.tensor(forwards_for_me_R, device=dev)[:, None]
        self._remote_gateway_R = torch.tensor(forwards_for_me_R, device=dev) & (self._node_R != me_node)

    def dispatch(self, x_TD, topk_ids_TK, topk_weights_TK, route):
        check_inputs(x_TD, topk_ids_TK, topk_weights_TK, route, self.world_size)
        num_tokens, hidden = x_TD.shape
        top_k = topk_ids_TK.shape[1]
        R, M, dev = self.world_size, self.num_nodes, x_TD.device
        dst_TK, slot_TK = route.route(topk_ids_TK, self.rank)
        node_TK = self._node_R[dst_TK]
        to_rank_TR = torch.zeros(num_tokens, R, dtype=torch.bool, device=dev).scatter_(1, dst_TK, True)
        to_node_TM = torch.zeros(num_tokens, M, dtype=torch.bool, device=dev).scatter_(1, node_TK, True)
        # One stage-1 row per (token, remote node), addressed to this rank's gateway of that node.
        to_gw_TR = to_node_TM[:, self._node_R] & self._remote_gateway_R[None, :]
        send_counts_R = to_rank_TR.sum(0)
        send1_R = to_gw_TR.sum(0)

        # Counts: [stage-1 rows, logical rows, rows g forwards to each r] to every rank g (module docstring).
        plan_RC = torch.cat([send1_R[:, None], send_counts_R[:, None],
                             send_counts_R[None, :] * self._forward_via_RR], dim=1)
        got_RC = torch.empty_like(plan_RC)
        self._a2a(got_RC, plan_RC)
        recv1_R, recv_counts_R = got_RC[:, 0], got_RC[:, 1]
        send2_R = got_RC[:, 2:].sum(0)
        recv2_R = torch.empty_like(send2_R)
        self._a2a(recv2_R, send2_R)
        # host sync: the one per dispatch; every split size must be on the host.
        counts = torch.cat([send1_R, recv1_R, send2_R, recv2_R, send_counts_R, recv_counts_R]).tolist()
        send1, recv1, send2, recv2, send_counts, recv_counts = (counts[i * R:(i + 1) * R] for i in range(6))

        # Stage 1 (network): rows in (gateway, token) order; entries outside the gateway's node are -1.
        gateway_token = torch.nonzero_static(to_gw_TR.T, size=sum(send1))  # [S1, 2]: (gateway rank, token)
        send1_tok_S = gateway_token[:, 1]
        in_node_SK = node_TK.index_select(0, send1_tok_S) == self._node_R[gateway_token[:, 0]][:, None]
        send1_dst_SK = torch.where(in_node_SK, dst_TK.index_select(0, send1_tok_S), -1)
        send1_slot_SK = slot_TK.index_select(0, send1_tok_S)
        send1_w_SK = topk_weights_TK.index_select(0, send1_tok_S)
        send1_w_SK = torch.where(in_node_SK, send1_w_SK, torch.zeros_like(send1_w_SK))
        num_recv1 = sum(recv1)
        recv1_x_ND = x_TD.new_empty(num_recv1, hidden)
        send1_meta_SB = torch.cat([send1_dst_SK.to(torch.int32).contiguous().view(torch.uint8),
                                   pack_meta(send1_slot_SK, send1_w_SK)], dim=1)
        recv1_meta_NB = send1_meta_SB.new_empty(num_recv1, send1_meta_SB.shape[1])
        if M > 1:  # one node: nothing crosses, and every rank knows it
            self._a2a(recv1_x_ND, x_TD.index_select(0, send1_tok_S), recv1, send1)
            self._a2a(recv1_meta_NB, send1_meta_SB, recv1, send1)
        recv1_dst_NK = recv1_meta_NB[:, : 4 * top_k].clone(memory_format=torch.contiguous_format).view(torch.int32)
        recv1_slot_NK, recv1_w_NK = unpack_meta(recv1_meta_NB[:, 4 * top_k:], top_k, topk_weights_TK.dtype)

        # Stage 2 (NVLink): forwarded rows = this rank's tokens (entries in its node), then the stage-1 rows.
        mine_TK = node_TK == self.my_node
        fwd_dst_FK = torch.cat([torch.where(mine_TK, dst_TK, -1), recv1_dst_NK.long()])
        fwd_slot_FK = torch.cat([slot_TK.to(torch.int32), recv1_slot_NK])
        fwd_w_FK = torch.cat([topk_weights_TK, recv1_w_NK])
        num_fwd = fwd_dst_FK.shape[0]
        # Column R collects the -1 entries and is cut off.
        to_rank_FR = torch.zeros(num_fwd, R + 1, dtype=torch.bool, device=dev).scatter_(
            1, torch.where(fwd_dst_FK < 0, R, fwd_dst_FK), True)[:, :R]
        rank_fwd = torch.nonzero_static(to_rank_FR.T, size=sum(send2))  # [S2, 2]: (destination rank, forwarded row)
        send2_rank_S, send2_fwd_S = rank_fwd[:, 0], rank_fwd[:, 1]
        here_SK = fwd_dst_FK.index_select(0, send2_fwd_S) == send2_rank_S[:, None]
        send2_ids_SK = torch.where(here_SK, fwd_slot_FK.index_select(0, send2_fwd_S), -1)
        w_SK = fwd_w_FK.index_select(0, send2_fwd_S)
        send2_w_SK = torch.where(here_SK, w_SK, torch.zeros_like(w_SK))
        send2_x_SD = torch.cat([x_TD, recv1_x_ND]).index_select(0, send2_fwd_S)
        num_recv = sum(recv2)
        recv_x_ND = x_TD.new_empty(num_recv, hidden)
        self._a2a(recv_x_ND, send2_x_SD, recv2, send2)
        send2_meta_SB = pack_meta(send2_ids_SK, send2_w_SK)
        recv_meta_NB = send2_meta_SB.new_empty(num_recv, send2_meta_SB.shape[1])
        self._a2a(recv_meta_NB, send2_meta_SB, recv2, send2)
        recv_ids_NK, recv_weights_NK = unpack_meta(recv_meta_NB, top_k, topk_weights_TK.dtype)
        meta = TwoLevelMeta(
            recv_topk_ids_NK=recv_ids_NK, recv_topk_weights_NK=recv_weights_NK, num_tokens=num_tokens,
            send_token_idx_S=send1_tok_S, send_counts_R=send_counts_R, recv_counts_R=recv_counts_R,
            send_counts=send_counts, recv_counts=recv_counts,
            row_bytes=hidden * x_TD.element_size(), meta_row_bytes=meta_row_bytes(topk_weights_TK),
            inter_node_rows=send1_R, stage1_send=send1, stage1_recv=recv1, stage2_send=send2, stage2_recv=recv2,
            stage2_fwd_idx_S=send2_fwd_S,
            # Both stages' rows leave this rank (rows to itself included, as the exact backend counts them).
            wire_rows=sum(send1) + sum(send2))
        return recv_x_ND, meta

    def combine(self, y_ND, meta):
        if not isinstance(meta, TwoLevelMeta):
            raise ValueError(f"combine of backend 'two_level' needs the meta its dispatch returned, got "
                             f"{type(meta).__name__}.")
        num_recv = sum(meta.stage2_recv)
        if y_ND.dim() != 2 or y_ND.shape[0] != num_recv:
            raise ValueError(f"combine y_ND must have {num_recv} rows (one per received row), got {tuple(y_ND.shape)}.")
        hidden = y_ND.shape[1]
        # Stage 2 back: each forwarder sums its rows' results, one partial row per forwarded row.
        back2_SD = y_ND.new_empty(meta.stage2_fwd_idx_S.shape[0], hidden)
        self._a2a(back2_SD, y_ND.contiguous(), meta.stage2_send, meta.stage2_recv)
        num_tokens, num_recv1 = meta.num_tokens, sum(meta.stage1_recv)
        part_FD = y_ND.new_zeros(num_tokens + num_recv1, hidden).index_add_(0, meta.stage2_fwd_idx_S, back2_SD)
        # Stage 1 back: one row per (token, remote node) crosses the network again.
        back1_SD = y_ND.new_empty(meta.send_token_idx_S.shape[0], hidden)
        if self.num_nodes > 1:
            self._a2a(back1_SD, part_FD[num_tokens:], meta.stage1_send, meta.stage1_recv)
        return part_FD[:num_tokens].index_add_(0, meta.send_token_idx_S, back1_SD)

    def _a2a(self, out, inp, out_splits=None, in_splits=None) -> None:
        if self.world_size == 1:
            out.copy_(inp)
        else:
            dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group)


__all__ = ["TwoLevelAllToAll", "TwoLevelMeta", "check_node_of_rank", "node_numbers"]
