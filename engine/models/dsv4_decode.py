"""DeepSeek-V4's attention for a pure-decode step, batched and from device lengths only: what a decode CUDA graph
captures (engine/rank/cuda_graph.py). The prefill / mixed path (dsv4_attention.DSV4Attention._sequence) loops over
the sequences with their host lengths; a decode step (every row one query, `AttentionMetadata.max_query_len == 1`)
runs here, eager or replayed, so a replay equals the eager step.

Per row s, its one query at position p = seq_lens_S[s] - 1 (device), its state slot, its block table:
1. the window ring takes the token's kv at p mod W; the query's window keys are the ring's W rows, the row at ring
   index r holding position p - ((p - r) mod W), seen where that is >= 0;
2. the compressor ring takes the token's row at p mod ring; the entry of the window w = p // m is pooled from the
   ring's rows of positions w m .. w m + m - 1 (CSA: and the previous window's Ca half, none before window 0) for
   every row, and written to its block only where the window closes here ((p + 1) mod m == 0): a read-modify-write
   (torch.where), so no host branch;
3. entries for the attention, gathered through the block table up to the host bound E = min(max_model_len,
   table width x L) / m: all of them, seen below (p + 1) / m (HCA), or the indexer's top-k of the index keys so
   gathered (CSA);
4. sink attention over [window | entries] with each row's own keys (the kernels' per-query key layout); keys a row
   may not see are zeroed first (a ring row from a slot's earlier request, a never-written entry).
Padding rows (state slot -1, a captured graph's rows past the batch) read the null slot and the null block and
write nothing.

Cost (noted, not yet optimised): a CSA row gathers all E index keys ([E, I]) before scoring them, an HCA row all E
entries ([E, H]); the kernels could read them through the block table instead.

Legend: T rows (one query each), N heads, H head_dim, W window, m compress rate, C a compressor row, E entries (host
bound), K index top-k, I index head dim, L block size, Lc = L / m entries per block.
"""
from __future__ import annotations

import torch

from moelink.kernels.dsv4 import reference_rms_norm_f32


def decode_attention(layer, q_TNH, kv_TH, rows_TC, idx, ctx, paged, state) -> torch.Tensor:
    """`layer`: a DSV4Attention; the rest as its forward computed them. Returns [T, N, H] (before the inverse rope)."""
    cfg, dev = layer.cfg, q_TNH.device
    attn = ctx.attn
    p_T = attn.seq_lens_S.long() - 1
    slot_T = ctx.state.slots_S.long()
    live_T = slot_T >= 0
    slot_T = torch.where(live_T, slot_T, state[0].shape[0] - 1)  # padding rows: the null slot (read only)
    table_TM = attn.block_tables_SM.long()
    W = cfg.sliding_window
    window_PWH = state[0]
    _write_rows(window_PWH, slot_T, p_T % W, kv_TH, live_T)
    keys_TWH = window_PWH[slot_T]
    r_W = torch.arange(W, device=dev)
    seen_TW = p_T[:, None] - (p_T[:, None] - r_W[None, :]) % W >= 0
    keys, seen = [keys_TWH], [seen_TW]
    if layer.compressor is not None:
        m = cfg.compress_rate
        max_pos = layer.compress_rope.cos_Ph.shape[0]  # max_model_len: a host bound
        E = min(max_pos, table_TM.shape[1] * paged[0].shape[1] * m) // m
        visible_T = (p_T + 1) // m
        _close_window(layer, layer.compressor, rows_TC, state[1], paged[0], p_T, slot_T, live_T, table_TM)
        e_E = torch.arange(E, device=dev)
        if layer.indexer is not None:  # CSA: the indexer's top-k of the visible entries
            irows_TC, iq_TnI, iw_Tn = idx
            _close_window(layer, layer.indexer, irows_TC, state[2], paged[1], p_T, slot_T, live_T, table_TM)
            keys_TEI = _gather_entries(paged[1], table_TM, e_E[None, :].expand(len(p_T), -1))
            keys_TEI = torch.where((e_E[None, :] < visible_T[:, None])[..., None], keys_TEI, 0)
            picks_TK = layer.indexer_topk(iq_TnI, iw_Tn, keys_TEI, visible_T, cfg.index_topk).long()
            keys.append(_gather_entries(paged[0], table_TM, picks_TK.clamp(min=0)))
            seen.append(picks_TK >= 0)
        else:  # HCA: every visible entry
            keys.append(_gather_entries(paged[0], table_TM, e_E[None, :].expand(len(p_T), -1)))
            seen.append(e_E[None, :] < visible_T[:, None])
    keys_TSH, seen_TS = torch.cat(keys, dim=1), torch.cat(seen, dim=1)
    keys_TSH = torch.where(seen_TS[..., None], keys_TSH, 0).to(q_TNH.dtype)
    return layer.sink_attention(q_TNH, keys_TSH, seen_TS, layer.sinks_N, cfg.softmax_scale)


def _write_rows(pool_PXC, slot_T, at_T, rows_TC, live_T) -> None:
    """pool[slot, at] = row for live rows; padding rows write back what is there (no host branch)."""
    old = pool_PXC[slot_T, at_T]
    pool_PXC[slot_T, at_T] = torch.where(live_T[:, None], rows_TC.to(pool_PXC.dtype), old)


def _gather_entries(entries_BLcX, table_TM, e_TE) -> torch.Tensor:
    """Entries e_TE of each row's sequence, [T, E', X]: entry e sits in block table[e // Lc] at e mod Lc."""
    Lc = entries_BLcX.shape[1]
    blk_TE = table_TM.gather(1, e_TE // Lc)
    return entries_BLcX[blk_TE, e_TE % Lc]


def _close_window(layer, comp, rows_TC, ring_PXC, entries_BLcX, p_T, slot_T, live_T, table_TM) -> None:
    """Step 2 of the module docstring for one compressor (the attention's or the indexer's)."""
    m, ring = comp.rate, ring_PXC.shape[1]
    _write_rows(ring_PXC, slot_T, p_T % ring, rows_TC, live_T)
    w_T = p_T // m
    pos_Tm = w_T[:, None] * m + torch.arange(m, device=p_T.device)[None, :]
    cur = ring_PXC[slot_T[:, None], pos_Tm % ring]  # [T, m, C]
    half = cur.shape[-1] // 2
    dtype = entries_BLcX.dtype
    kv, gate = cur[..., :half].to(dtype), cur[..., half:]
    prev_kv = prev_gate = None
    if comp.overlap:  # the previous window's Ca half; none before window 0 (softmax weight 0)
        H = comp.width
        prev = ring_PXC[slot_T[:, None], (pos_Tm - m) % ring]
        first = (w_T == 0)[:, None, None]
        prev_kv = torch.where(first, 0, prev[..., :H]).to(dtype)
        prev_gate = torch.where(first, float("-inf"), prev[..., half: half + H])
    pooled = comp.compress(kv, gate, prev_kv, prev_gate)
    normed = reference_rms_norm_f32(pooled, comp.norm_H, comp.eps)
    new_TX = layer.compress_rope.rotate(normed[:, None, :], w_T * m)[:, 0, :]
    Lc = entries_BLcX.shape[1]
    blk_T = table_TM.gather(1, (w_T // Lc)[:, None])[:, 0]
    closes_T = live_T & ((p_T + 1) % m == 0)
    old = entries_BLcX[blk_T, w_T % Lc]
    entries_BLcX[blk_T, w_T % Lc] = torch.where(closes_T[:, None], new_TX.to(dtype), old)


__all__ = ["decode_attention"]
