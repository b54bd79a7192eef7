"""DeepSeek-V4's attention for a pure-decode step, batched and from device lengths only: what a decode CUDA graph
captures (engine/rank/cuda_graph.py). The prefill / mixed path (dsv4_attention.DSV4Attention._sequence) loops over
the sequences with their host lengths; a decode step (every row one query, `AttentionMetadata.max_query_len == 1`)
runs here, eager or replayed, so a replay equals the eager step.

Per row s, its one query at position p = seq_lens_S[s] - 1 (device), its state slot, its block table:
1. the window ring takes the token's kv at p mod W; the query's window keys are the ring's W rows, the row at ring
   index r holding position p - ((p - r) mod W), seen where that is >= 0 (kernels/compressed_attention.window_seen);
2. the compressor ring takes the token's row at p mod ring; the entry of the window w = p // m is pooled from the
   ring's rows of positions w m .. w m + m - 1 (CSA: and the previous window's Ca half, none before window 0) for
   every row, and written to its block only where the window closes here ((p + 1) mod m == 0): a read-modify-write
   (torch.where), so no host branch;
3. CSA: the indexer's top-k of the (p + 1) // m visible index keys, the kernel strategy's
   `paged_compressed_indexer_topk` reading each key through the row's block table (no [T, E, I] copy);
4. sink attention over [window | entries], `paged_sink_attention`: the window rows read from the row's slot,
   the entries from their blocks: the picks (CSA) or every visible entry (HCA; none on a sliding layer). Rows a
   query may not see (a ring row from a slot's earlier request, a never-written entry) are read as zeros.
Under an fp8 KV cache the entries and index keys (and the window ring where the layer's config says so) are uint8 rows
(kernels/compressed_attention.FP8Rows): steps 1-2 write them quantized, steps 3-4 dequantize them inside the paged ops
(the layer's rope dims tell the entry layout).
Padding rows (state slot -1, a captured graph's rows past the batch) write back the null slot's and the null
block's rows (nothing changes) and attend to nothing (sink only). The table's width bounds the entries a row may
have (E = M Lc, a host size): no shape follows the lengths.

Legend: T rows (one query each), N heads, H head_dim, W window, m compress rate, C a compressor row, K index top-k,
I index head dim, L block size, Lc = L / m entries per block, M block-table width.
"""
from __future__ import annotations


import torch

from moelink.kernels.compressed_attention import reference_rms_norm_f32, write_form


def decode_attention(layer, q_TNH, kv_TH, rows_TC, idx, ctx, paged, state) -> torch.Tensor:
    """`layer`: a DSV4Attention; the rest as its forward computed them. Returns [T, N, H] (before the inverse rope)."""
    cfg = layer.cfg
    paged_topk, paged_attention = layer.paged_indexer_topk, layer.paged_sink_attention
    attn = ctx.attn
    p_T = attn.seq_lens_S.long() - 1
    slot_T = ctx.state.slots_S.long()
    live_T = slot_T >= 0
    write_T = torch.where(live_T, slot_T, state[0].shape[0] - 1)  # padding rows: the null slot (written back as is)
    table_TM = attn.block_tables_SM
    _write_rows(state[0], write_T, p_T % cfg.sliding_window, kv_TH, live_T, layer.window_rows)
    entries = picks_TK = visible_T = None
    if layer.compressor is not None:
        visible_T = (p_T + 1) // cfg.compress_rate
        entries, tables = paged[0], table_TM.long()
        _close_window(layer, layer.compressor, rows_TC, state[1], entries, layer.row_formats[0], p_T, write_T, live_T,
                      tables, q_TNH.dtype)
        if layer.indexer is not None:  # CSA: the indexer's top-k of the visible entries
            irows_TC, iq_TnI, iw_Tn = idx
            _close_window(layer, layer.indexer, irows_TC, state[2], paged[1], layer.row_formats[1], p_T, write_T,
                          live_T, tables, q_TNH.dtype)
            picks_TK = paged_topk(iq_TnI, iw_Tn, paged[1], table_TM, visible_T, cfg.index_topk)
    # slot_T itself (-1 on padding rows: they see no window row)
    return paged_attention(q_TNH, state[0], slot_T, p_T, entries, table_TM, picks_TK, visible_T, layer.sinks_N,
                           cfg.softmax_scale, rope_dims=cfg.rope.rotary_dim)


def _write_rows(pool_PXC, slot_T, at_T, rows_TC, live_T, fmt=None) -> None:
    """pool[slot, at] = row (fp8-encoded by `fmt` where the pool holds bytes) for live rows; padding rows write back
    what is there (no host branch)."""
    old = pool_PXC[slot_T, at_T]
    pool_PXC[slot_T, at_T] = torch.where(live_T[:, None], write_form(pool_PXC, fmt, rows_TC), old)


def _close_window(layer, comp, rows_TC, ring_PXC, entries_BLcX, fmt, p_T, slot_T, live_T, table_TM,
                  dtype: torch.dtype) -> None:
    """Step 2 of the module docstring for one compressor (the attention's or the indexer's), the entry computed in
    `dtype` (the activations') and stored as the pages hold it (`fmt`'s fp8 rows, or their float dtype)."""
    m, ring = comp.rate, ring_PXC.shape[1]
    _write_rows(ring_PXC, slot_T, p_T % ring, rows_TC, live_T)
    w_T = p_T // m
    pos_Tm = w_T[:, None] * m + torch.arange(m, device=p_T.device)[None, :]
    cur = ring_PXC[slot_T[:, None], pos_Tm % ring]  # [T, m, C]
    half = cur.shape[-1] // 2
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
    entries_BLcX[blk_T, w_T % Lc] = torch.where(closes_T[:, None], write_form(entries_BLcX, fmt, new_TX), old)


__all__ = ["decode_attention"]
