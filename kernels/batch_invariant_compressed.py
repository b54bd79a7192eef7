"""The batch-invariant backend's kernels for compressed-KV attention (CSA / HCA, DeepSeek-V4;
kernels/compressed_attention.py holds the references whose contracts these keep).

What moves with the batch in the references: the attention's keys are padded to the step's widest row and summed in
one softmax over that width, and a decode step lays a query's window out in its ring's order while a prefill lays it
out by position; the indexer's scores are one einsum over the padded width; the grouped projection is an einsum.
Here each query walks the keys it sees in one canonical order, its window by position and then its entries by id (the
indexer's picks ascending, or every visible one), in blocks of BLOCK keys from the first, with an online softmax that
starts at the head's sink (kernels/batch_invariant_kernels.walk_blocks): keys past a row's count are exact no-ops, so
the step's width changes nothing, and a decode step's query gets the bits its position gets in a prefill (what a
trainer recomputes). The indexer scores each row alone on blocks of BLOCK entries; the grouped projection runs one
linear per group on the mode's row tiles.

Legend: T queries, N heads, H head dim, S keys a query may see, W the window, E entries, K picks, n index heads,
I index head dim, G groups, B BLOCK.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .batch_invariant import fixed_bmm
from .batch_invariant_kernels import walk_blocks
from .compressed_attention import (entry_rows, index_key_rows, is_fp8_pages, visible_pages, window_seen,
                                   with_paged_entries)
from .dsa import reference_topk_positions

BLOCK = 16  # keys (and index entries) per step of the walk: fixed, whatever the batch


def invariant_sink_attention(q_TNH: torch.Tensor, k_SH: torch.Tensor, allowed_TS: torch.Tensor, sinks_N: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """`reference_sink_attention`'s contract (one shared head that is key and value, a sink logit per head): each
    query's allowed keys, compacted in their order in k_SH, walked BLOCK at a time. Out [T, N, H] in q's dtype."""
    with torch._C.DisableTorchFunction():
        return _compacted_walk(q_TNH, k_SH, allowed_TS, sinks_N, scale)


def _compacted_walk(q_TNH, k_SH, allowed_TS, sinks_N, scale) -> torch.Tensor:
    T, S = allowed_TS.shape
    dev = q_TNH.device
    count_T = allowed_TS.sum(dim=1)
    # The allowed keys first, in their order (a stable sort of "not allowed"): a row's j-th key is its j-th seen one.
    order_TS = torch.sort((~allowed_TS).to(torch.int8), dim=1, stable=True).indices
    width = -(-S // BLOCK) * BLOCK
    if width > S:
        order_TS = F.pad(order_TS, (0, width - S))
    keys_TSH = k_SH.gather(1, order_TS[..., None].expand(-1, -1, k_SH.shape[-1])) if k_SH.dim() == 3 \
        else k_SH.index_select(0, order_TS.reshape(-1)).view(T, width, -1)
    # The walk reads keys from a paged "cache" by slot: here one row's compacted keys are its own B-slot blocks.
    cache_X1H = keys_TSH.reshape(T * width, 1, 1, -1)
    offs_B = torch.arange(BLOCK, device=dev)

    def blocks():
        for j in range(width // BLOCK):
            idx_TB = j * BLOCK + offs_B[None, :]
            yield torch.arange(T, device=dev)[:, None] * width + idx_TB, idx_TB < count_T[:, None]
    return walk_blocks(q_TNH, cache_X1H.view(T * width, 1, 1, -1), cache_X1H.view(T * width, 1, 1, -1), blocks(),
                       scale, sinks_N, 1.0, 1.0, None)


def invariant_paged_sink_attention(q_TNH: torch.Tensor, window_PWH: torch.Tensor, slot_T: torch.Tensor,
                                   pos_T: torch.Tensor, entries_BLcH: torch.Tensor | None,
                                   table_TM: torch.Tensor | None, picks_TK: torch.Tensor | None,
                                   visible_T: torch.Tensor | None, sinks_N: torch.Tensor, scale: float, *,
                                   rope_dims: int = 0) -> torch.Tensor:
    """`reference_paged_sink_attention`'s contract, the window read from the ring by position (oldest first, as a
    prefill lays it out), then the entries by id: the same walk as a prefill's query at that position."""
    with torch._C.DisableTorchFunction():
        fmt = entry_rows(q_TNH.shape[2], rope_dims)
        W = window_PWH.shape[1]
        dev = q_TNH.device
        p_T1 = pos_T.long()[:, None]
        ring_TW = (p_T1 - W + 1 + torch.arange(W, device=dev)[None, :]) % W  # position p - W + 1 + i, i = 0..W-1
        keys_TWH = window_PWH[slot_T.long().clamp(min=0)[:, None], ring_TW]
        if is_fp8_pages(window_PWH):
            keys_TWH = fmt.decode(keys_TWH, q_TNH.dtype)
        seen_TW = window_seen(pos_T, slot_T, W).gather(1, ring_TW)
        keys_TSH, seen_TS = with_paged_entries(keys_TWH, seen_TW, entries_BLcH, table_TM, picks_TK, visible_T, fmt,
                                               q_TNH.dtype)
        return _compacted_walk(q_TNH, keys_TSH, seen_TS, sinks_N, scale)


def invariant_compressed_indexer_topk(q_TnI: torch.Tensor, w_Tn: torch.Tensor, keys_EI: torch.Tensor,
                                      visible_T: torch.Tensor, top_k: int) -> torch.Tensor:
    """`reference_indexer_topk`'s choice with each row's scores computed alone, BLOCK entries at a time: the n x I
    by I x B product of its index queries and keys, relu, then the 1 x n by n x B product with its weights, all in
    float32 (one shape per model); the top-k as the reference picks it."""
    with torch._C.DisableTorchFunction():
        T, n, I = q_TnI.shape
        E = keys_EI.shape[-2]
        keys_TEI = keys_EI if keys_EI.dim() == 3 else keys_EI[None].expand(T, -1, -1)
        width = -(-E // BLOCK) * BLOCK
        q_TnI32 = q_TnI.float().contiguous()
        w_T1n = (w_Tn.float() * n ** -0.5).view(T, 1, n).contiguous()
        scores_TE = torch.full((T, width), float("-inf"), dtype=torch.float32, device=q_TnI.device)
        for j in range(0, E, BLOCK):
            k_TIB = keys_TEI[:, j:j + BLOCK].float()
            if k_TIB.shape[1] < BLOCK:  # the last block zero-padded: one shape
                k_TIB = F.pad(k_TIB, (0, 0, 0, BLOCK - k_TIB.shape[1]))
            s_TnB = torch.relu(fixed_bmm(q_TnI32, k_TIB.transpose(1, 2).contiguous())) * I ** -0.5
            scores_TE[:, j:j + BLOCK] = fixed_bmm(w_T1n, s_TnB)[:, 0] + 0.0  # + 0.0: -0.0 counts as 0.0
        return reference_topk_positions(scores_TE[:, :E], visible_T, top_k)


def invariant_paged_compressed_indexer_topk(q_TnI: torch.Tensor, w_Tn: torch.Tensor, keys_BLcI: torch.Tensor,
                                            table_TM: torch.Tensor, visible_T: torch.Tensor,
                                            top_k: int) -> torch.Tensor:
    """`reference_paged_indexer_topk`'s contract: the keys gathered through the tables, then scored as above."""
    with torch._C.DisableTorchFunction():
        keys_TEI, _ = visible_pages(keys_BLcI, table_TM, visible_T, index_key_rows(q_TnI.shape[2]), torch.float32)
    return invariant_compressed_indexer_topk(q_TnI, w_Tn, keys_TEI, visible_T, top_k)


def invariant_grouped_linear(x_TGd: torch.Tensor, w_GoD: torch.Tensor) -> torch.Tensor:
    """`reference_grouped_linear` as one linear per group, each on the mode's row tiles: [T, G, o]."""
    return torch.stack([F.linear(x_TGd[:, g], w_GoD[g]) for g in range(w_GoD.shape[0])], dim=1)


__all__ = ["BLOCK", "invariant_compressed_indexer_topk", "invariant_grouped_linear",
           "invariant_paged_compressed_indexer_topk", "invariant_paged_sink_attention", "invariant_sink_attention"]
