"""The counted all-to-all backends: "none" (world size 1) and "torch" (torch.distributed, exact splits).

Legend: T tokens on this rank, D hidden, K top-k, R ranks (EP world size),
S rows this rank sends, N rows this rank receives. The interface, its
semantics and `DispatchMeta` are in comm/a2a_base.py.

Buffer layout of the "torch" backend (exact): the send buffer holds rows
grouped by destination rank in rank order, within a rank in token order; S =
Σ send_counts. The receive buffer is the concatenation over source ranks in
rank order of what each sent here, again in the sender's token order; N = Σ
recv_counts. combine returns y_ND in the same row order. The padded backends
(comm/nccl_all_to_all.py) use fixed blocks instead, documented there.

Backends are strategy objects chosen once, by name, from the registry in
comm/backends.py.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .a2a_base import AllToAll, DispatchMeta, PendingHandle, check_inputs, meta_row_bytes, pack_meta, unpack_meta


class NoAllToAll(AllToAll):
    """World size 1: nothing moves. recv_x is x itself; ids are mapped to local slots."""

    name = "none"

    def __init__(self, group, rank: int, world_size: int, device):
        if world_size != 1:
            raise ValueError(f"all-to-all backend 'none' is for world size 1, got {world_size}: use 'torch' or 'nccl'.")
        super().__init__(group, rank, world_size, device)

    def dispatch(self, x_TD, topk_ids_TK, topk_weights_TK, route):
        check_inputs(x_TD, topk_ids_TK, topk_weights_TK, route, self.world_size)
        # Every pair stays here (one rank holds every expert, once): only the local slots are needed.
        _, slot_TK = route.route(topk_ids_TK, self.rank)
        num_tokens = x_TD.shape[0]
        counts_R = torch.full((1,), num_tokens, dtype=torch.int64, device=x_TD.device)
        meta = DispatchMeta(
            recv_topk_ids_NK=slot_TK, recv_topk_weights_NK=topk_weights_TK, num_tokens=num_tokens,
            send_token_idx_S=None, send_counts_R=counts_R, recv_counts_R=counts_R,
            send_counts=[num_tokens], recv_counts=[num_tokens],
            row_bytes=x_TD.shape[1] * x_TD.element_size(), meta_row_bytes=meta_row_bytes(topk_weights_TK),
            wire_rows=0)  # nothing leaves the rank
        return x_TD, meta

    def combine(self, y_ND, meta):
        if y_ND.shape[0] != meta.num_tokens:
            raise ValueError(f"combine got {y_ND.shape[0]} rows, dispatch produced {meta.num_tokens}.")
        return y_ND


class TorchAllToAll(AllToAll):
    """torch.distributed `all_to_all_single` with exact (uneven) splits; gloo on CPU, NCCL on GPU.

    Per dispatch: one collective for the counts (then THE one host sync, to size
    the buffers), one for the x rows, one for ids+weights packed as bytes; the
    last two are issued async (`dispatch_async`: the caller works while they
    travel). Per combine: one async collective, no sync. The blocking calls are
    the async ones waited at once. gloo supports uneven splits (checked
    on torch 2.13, bf16 included), so no fallback path is needed. Not CUDA-graph
    safe (the counts sync); the padded backends are.
    """

    name = "torch"

    def __init__(self, group, rank: int, world_size: int, device):
        if group is None:
            raise ValueError("all-to-all backend 'torch' needs a process group (comm.init_process_group).")
        super().__init__(group, rank, world_size, device)

    # The blocking calls are the async ones waited at once (untracked: they never wait out of order).
    def dispatch(self, x_TD, topk_ids_TK, topk_weights_TK, route):
        return self._start_dispatch(x_TD, topk_ids_TK, topk_weights_TK, route).wait()

    def combine(self, y_ND, meta):
        return self._start_combine(y_ND, meta).wait()

    def dispatch_async(self, x_TD, topk_ids_TK, topk_weights_TK,  # type: ignore[override]  # no options: it sizes
                       route) -> PendingHandle:  # each dispatch by a counts exchange
        """The counts exchange runs now (blocking: the split sizes must reach the host); the x rows and the packed
        ids+weights travel as two async collectives, and `wait()` waits for both and unpacks the metadata."""
        return self._issued(self._start_dispatch(x_TD, topk_ids_TK, topk_weights_TK, route))

    def combine_async(self, y_ND, meta) -> PendingHandle:
        """One async collective; `wait()` waits for it and sums each token's rows."""
        return self._issued(self._start_combine(y_ND, meta))

    def _start_dispatch(self, x_TD, topk_ids_TK, topk_weights_TK, route) -> PendingHandle:
        check_inputs(x_TD, topk_ids_TK, topk_weights_TK, route, self.world_size)
        num_tokens, hidden = x_TD.shape
        top_k = topk_ids_TK.shape[1]
        R, dev = self.world_size, x_TD.device
        dst_TK, slot_TK = route.route(topk_ids_TK, self.rank)
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
        send_meta_SB = pack_meta(send_ids_SK, send_weights_SK)
        recv_meta_NB = send_meta_SB.new_empty(num_recv, send_meta_SB.shape[1])
        works = [dist.all_to_all_single(recv_x_ND, send_x_SD, recv_counts, send_counts, group=self.group,
                                        async_op=True),
                 dist.all_to_all_single(recv_meta_NB, send_meta_SB, recv_counts, send_counts, group=self.group,
                                        async_op=True)]

        def finish():
            recv_ids_NK, recv_weights_NK = unpack_meta(recv_meta_NB, top_k, topk_weights_TK.dtype)
            meta = DispatchMeta(
                recv_topk_ids_NK=recv_ids_NK, recv_topk_weights_NK=recv_weights_NK, num_tokens=num_tokens,
                send_token_idx_S=send_tok_S, send_counts_R=send_counts_R, recv_counts_R=recv_counts_R,
                send_counts=send_counts, recv_counts=recv_counts,
                row_bytes=hidden * x_TD.element_size(), meta_row_bytes=meta_row_bytes(topk_weights_TK),
                wire_rows=num_send)
            return recv_x_ND, meta

        return PendingHandle(works, finish, keep=(send_x_SD, send_meta_SB))

    def _start_combine(self, y_ND, meta) -> PendingHandle:
        num_recv = sum(meta.recv_counts)
        if y_ND.dim() != 2 or y_ND.shape[0] != num_recv:
            raise ValueError(f"combine y_ND must have {num_recv} rows (one per received row), got {tuple(y_ND.shape)}.")
        y_ND = y_ND.contiguous()
        back_SD = y_ND.new_empty(meta.send_token_idx_S.shape[0], y_ND.shape[1])
        work = dist.all_to_all_single(back_SD, y_ND, meta.send_counts, meta.recv_counts, group=self.group,
                                      async_op=True)

        def finish():
            # index_add_ sums a token's rows in rank order: deterministic on CPU; on CUDA it uses atomics
            # unless torch.use_deterministic_algorithms(True).
            out_TD = y_ND.new_zeros(meta.num_tokens, y_ND.shape[1])
            return out_TD.index_add_(0, meta.send_token_idx_S, back_SD)

        return PendingHandle([work], finish, keep=(y_ND,))


__all__ = ["NoAllToAll", "TorchAllToAll"]
