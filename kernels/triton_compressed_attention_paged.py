"""DeepSeek-V4's decode attention over the cache where it lies (issue 45): a batched decode step's indexer and sink
attention read the index keys and the compressed entries through each query's block table, and its window rows
from its state slot, inside the kernels: no [T, E, I] or [T, S, H] copy of them is made (what the best paged sparse
decode kernels do: FlashMLA's, vLLM's). Same contracts as compressed_attention.reference_paged_indexer_topk /
reference_paged_sink_attention (legend there), except that the picks come in any order.

- `triton_paged_compressed_indexer_topk`: grid (queries, G), about 4 programs per SM as triton_compressed_topk's. Each
  program holds its query's [n_I, I] index queries and walks tiles of BLOCK_E of its entries (G programs of a query
  interleaving tiles): entry e's key is read from block table[t, e // Lc] at e mod Lc, scored on tensor cores
  (triton_compressed_topk.score_tile) into a float32 [T, E] workspace (4 bytes an entry, against the 2 I bytes a
  gathered bf16 key costs), then DSA's top-k selection (triton_compressed_topk.select_topk).
- `triton_paged_sink_attention`: grid (queries, head tiles of 16, SPLITS). A query's keys are its W ring rows
  (seen as window_seen says), then its entries: the picks (CSA, -1 skipped) or every visible entry (HCA). Split s takes
  the key tiles s, s + SPLITS, ... of [window | entries] (two loops: the window's tiles, then the entries'), up to the
  row's own count (the loop bound is read on the device: a short row costs what it reads). Each tile runs
  triton_compressed_attention.sink_softmax_step from a running max floored at the head's sink. One split writes the
  output (the sink's exp(sink - max) joins the denominator at the end); more (small batches: the host picks them from T
  and the key bound, so a graph keeps them) write float32 partials (max, denominator, output) that `_paged_merge_kernel`
  folds with the sink.

Tensor cores (benchmarks/results/compile_report_sm90.md, the `compressed` family): the scores on wgmma on sm_90 (a tile
of 64 index heads), tcgen05 on sm_100; the attention on mma.sync (16 heads a program, below wgmma's 64 rows: V4-Flash's
64 heads are 4 programs a row, each reading the row's keys, the repeats served by L2).

No host sync and no data-dependent shape: the sizes come from the tensors' shapes (the table width bounds E).
Activations float32 / bfloat16 / float16; keys and window rows are cast to the query's dtype as they are read.
An fp8 KV cache's pages and window rows (uint8 rows, kernels/compressed_attention.FP8Rows) are dequantized as they are
read (`load_fp8_rows`: the e4m3 bytes times their group's float32 scale, the bfloat16 rope values widened; float32,
then the query's dtype, as the references decode them): the kernels read ~0.6 of a bf16 cache's bytes and make no
dequantized copy.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .compressed_attention import FP8Rows, entry_rows, index_key_rows, is_fp8_pages
from .triton_common import cast
from .triton_compressed_attention import sink_softmax_step
from .triton_compressed_topk import load_index_query, score_buffers, score_tile, select_topk


@triton.jit
def load_fp8_rows(p8_ptr, ps_ptr, pr_ptr, row, ok, d, NOPE, ROPE, GROUP: tl.constexpr, S0, R0):
    """float32 [rows, D] of fp8 cache rows (FP8Rows) starting at byte offsets `row` ([rows], int64; rows not `ok`
    read as zeros): the leading NOPE values e4m3 (p8_ptr: the pages as float8) times their group's scale (ps_ptr: as
    float32, the scales at byte S0 of a row), the next ROPE bfloat16 (pr_ptr: as bfloat16, at byte R0)."""
    dn = d[None, :]
    nope = ok[:, None] & (dn < NOPE)
    v = tl.load(p8_ptr + row[:, None] + dn, mask=nope, other=0.0).to(tl.float32)
    sc = tl.load(ps_ptr + (row[:, None] + S0) // 4 + dn // GROUP, mask=nope, other=0.0)
    rope = ok[:, None] & (dn >= NOPE) & (dn < NOPE + ROPE)
    r = tl.load(pr_ptr + (row[:, None] + R0) // 2 + (dn - NOPE), mask=rope, other=0.0).to(tl.float32)
    return tl.where(dn < NOPE, v * sc, r)


def fp8_page_args(pages: torch.Tensor, rows: FP8Rows | None) -> tuple:
    """The kernel arguments of one paged tensor: (as float8 or as is, as float32, as bfloat16, NOPE, ROPE, GROUP, S0,
    R0); for float pages the views are the tensor itself and the layout unread."""
    if rows is None:
        return pages, pages, pages, 0, 0, 1, 0, 0
    if not pages.is_contiguous() or pages.shape[-1] != rows.row_bytes:
        raise ValueError(f"fp8 pages {tuple(pages.shape)} are invalid: must be a contiguous [B, Lc, {rows.row_bytes}] "
                         f"uint8 tensor (FP8Rows(dim={rows.dim}, rope={rows.rope}, group={rows.group})).")
    return (pages.view(torch.float8_e4m3fn), pages.view(torch.float32), pages.view(torch.bfloat16), rows.nope,
            rows.rope, rows.group, rows.scale_offset, rows.rope_offset)


@triton.jit(do_not_specialize=["E", "G"])
def _paged_scores_kernel(q_ptr, w_ptr, pages_ptr, ps_ptr, pr_ptr, table_ptr, lens_ptr, scores_ptr, E, G, nI, I, Lc,
                         q_scale, w_scale, stride_qt, stride_qh, stride_wt, stride_pb, stride_pl, stride_tt, stride_st,
                         NOPE, ROPE, S0, R0, GROUP: tl.constexpr, FP8: tl.constexpr,
                         BLOCK_NI: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_E: tl.constexpr,
                         INTERPRET: tl.constexpr, PREC: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    n = tl.minimum(tl.load(lens_ptr + t), E)
    q, w = load_index_query(q_ptr, w_ptr, t, stride_qt, stride_qh, stride_wt, nI, I, w_scale, BLOCK_NI, BLOCK_I)
    d = tl.arange(0, BLOCK_I)
    for tile in range(tl.program_id(1), tl.cdiv(n, BLOCK_E), G):
        e = tile * BLOCK_E + tl.arange(0, BLOCK_E)
        ok = e < n
        blk = tl.load(table_ptr + t * stride_tt + e // Lc, mask=ok, other=0).to(tl.int64)
        row = blk * stride_pb + (e % Lc).to(tl.int64) * stride_pl
        if FP8:
            k = load_fp8_rows(pages_ptr, ps_ptr, pr_ptr, row, ok & (blk >= 0), d, NOPE, ROPE, GROUP, S0,
                              R0).to(q.dtype)
        else:
            k = tl.load(pages_ptr + row[:, None] + d[None, :], mask=(ok & (blk >= 0))[:, None] & (d[None, :] < I),
                        other=0.0).to(q.dtype)
        tl.store(scores_ptr + t * stride_st + e, score_tile(q, k, w, q_scale, INTERPRET, PREC), mask=ok)


def triton_paged_compressed_indexer_topk(q_TnI: torch.Tensor, w_Tn: torch.Tensor, keys_BLcI: torch.Tensor,
                                         table_TM: torch.Tensor, visible_T: torch.Tensor, top_k: int, *,
                                         num_splits: int | None = None) -> torch.Tensor:
    """int32 [T, top_k]: each query's top_k entries among its first visible_T[t] index keys, read from keys_BLcI
    [B, Lc, I] (or fp8 rows, uint8 [B, Lc, X]: index_key_rows(I)) through table_TM [T, M] (all of them, then -1,
    when fewer); any order. `num_splits` forces the
    top-k's programs per row (tests), else the selection picks from E = M Lc and the batch (host sizes)."""
    common.check_dtype("q_TnI", q_TnI)
    T, nI, I = q_TnI.shape
    fp8 = index_key_rows(I) if is_fp8_pages(keys_BLcI) else None
    width = fp8.row_bytes if fp8 is not None else I
    if (w_Tn.shape != (T, nI) or keys_BLcI.dim() != 3 or keys_BLcI.shape[2] != width or table_TM.dim() != 2
            or table_TM.shape[0] != T or visible_T.shape != (T,)):
        raise ValueError(f"w_Tn {tuple(w_Tn.shape)}, keys_BLcI {tuple(keys_BLcI.shape)}, table_TM "
                         f"{tuple(table_TM.shape)} and visible_T {tuple(visible_T.shape)} are invalid: must be "
                         f"[{T}, {nI}], [B, Lc, {width}], [{T}, M] and [{T}].")
    Lc = keys_BLcI.shape[1]
    E = table_TM.shape[1] * Lc
    out, scores, lens_T, block_e, warps = score_buffers(q_TnI, visible_T, E, top_k, num_splits)
    if T == 0:
        return out
    dev, interp, Ep = q_TnI.device, common.interpreting(q_TnI), scores.shape[1]
    q = q_TnI if q_TnI.stride(-1) == 1 else q_TnI.contiguous()
    keys = keys_BLcI if keys_BLcI.stride(-1) == 1 else keys_BLcI.contiguous()
    k8, ks, kr, nope, rope, group, s0, r0 = fp8_page_args(keys, fp8)
    table = table_TM.to(torch.int32)
    sms = num_sms(dev)
    G = max(1, min(Ep // block_e, triton.cdiv(4 * sms, T)))
    w = w_Tn.contiguous()
    _paged_scores_kernel[(T, G)](
        q, w, k8, ks, kr, table, lens_T, scores, E, G, nI, I, Lc, I**-0.5, nI**-0.5, q.stride(0), q.stride(1),
        w.stride(0), keys.stride(0), keys.stride(1), table.stride(0), scores.stride(0), nope, rope, s0, r0,
        GROUP=group, FP8=fp8 is not None, BLOCK_NI=max(16, triton.next_power_of_2(nI)),
        BLOCK_I=max(16, triton.next_power_of_2(I)), BLOCK_E=block_e,
        INTERPRET=interp, PREC=common.dot_precision(q.dtype), num_warps=warps)
    select_topk(scores, lens_T, top_k, out, sms, num_splits=num_splits)
    return out


@triton.jit(do_not_specialize=["KE", "SPLITS"])
def _paged_sink_attention_kernel(q_ptr, win_ptr, ws_ptr, wr_ptr, slot_ptr, pos_ptr, pages_ptr, ps_ptr, pr_ptr,
                                 table_ptr, picks_ptr,
                                 vis_ptr, sinks_ptr, out_ptr, part_ptr, ml_ptr, scale, N, H, W, KE, Lc,
                                 NOPE, ROPE, S0, R0,
                                 stride_qt, stride_qn, stride_wp, stride_ww, stride_pb, stride_pl, stride_tt,
                                 stride_kt, stride_ot, stride_on, stride_xt, stride_xs, stride_xn, stride_mi,
                                 stride_mt, stride_ms, SPLITS, GROUP: tl.constexpr, FP8: tl.constexpr,
                                 WIN_FP8: tl.constexpr,
                                 PICKS: tl.constexpr, PARTIAL: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
                                 INTERPRET: tl.constexpr, PREC: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    d = tl.arange(0, BLOCK_H)
    q = tl.load(q_ptr + t * stride_qt + heads[:, None] * stride_qn + d[None, :],
                mask=(heads[:, None] < N) & (d[None, :] < H), other=0.0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    p = tl.load(pos_ptr + t).to(tl.int64)
    # The row's own loop bound: its visible entries (HCA), or as many picks (CSA: the indexer leaves at most that
    # many, first; a short context skips the -1 tail of its top-k).
    n_ent = tl.minimum(tl.load(vis_ptr + t).to(tl.int32), KE)
    win_tiles = tl.cdiv(W, BLOCK_S)
    w_rows = tl.where(slot >= 0, W, 0)  # a padding row (slot -1) sees no ring row
    sink = tl.load(sinks_ptr + heads, mask=heads < N, other=0.0).to(tl.float32)
    # The running max is floored at the sink (finite: an empty tile or split changes nothing), the sink's own term
    # exp(sink - max) joins the denominator once, at the end (or in the merge).
    m_i = sink
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    # Window ring rows (tiles 0 .. win_tiles - 1 of the row's key tiles): row r holds position p - ((p - r) mod W),
    # seen where that is >= 0.
    for tile in range(split, win_tiles, SPLITS):
        r = tile * BLOCK_S + tl.arange(0, BLOCK_S)
        back = ((p - r) % W + W) % W  # (Triton's % truncates: p - r may be negative)
        ok = (r < w_rows) & (p - back >= 0)
        wrow = slot * stride_wp + r.to(tl.int64) * stride_ww
        if WIN_FP8:
            k = load_fp8_rows(win_ptr, ws_ptr, wr_ptr, wrow, ok, d, NOPE, ROPE, GROUP, S0, R0).to(q.dtype)
        else:
            k = tl.load(win_ptr + wrow[:, None] + d[None, :], mask=ok[:, None] & (d[None, :] < H),
                        other=0.0).to(q.dtype)
        m_i, l_i, acc = sink_softmax_step(q, k, ok, m_i, l_i, acc, scale, INTERPRET, PREC)
    # Entries (the key tiles after the window's, this split's by the same stride): the picks (CSA, -1 none) or
    # every visible one (HCA), each through the block table.
    for tile in range((split - win_tiles % SPLITS + SPLITS) % SPLITS, tl.cdiv(n_ent, BLOCK_S), SPLITS):
        j = tile * BLOCK_S + tl.arange(0, BLOCK_S)
        if PICKS:
            e = tl.load(picks_ptr + t * stride_kt + j, mask=j < n_ent, other=-1)
            ok = e >= 0
        else:
            e = j
            ok = j < n_ent
        blk = tl.load(table_ptr + t * stride_tt + e // Lc, mask=ok, other=0).to(tl.int64)
        ok = ok & (blk >= 0)
        # Rows not seen read as zeros: a never-written entry (NaN) must not reach P @ V.
        row = blk * stride_pb + (e % Lc).to(tl.int64) * stride_pl
        if FP8:
            k = load_fp8_rows(pages_ptr, ps_ptr, pr_ptr, row, ok, d, NOPE, ROPE, GROUP, S0, R0).to(q.dtype)
        else:
            k = tl.load(pages_ptr + row[:, None] + d[None, :], mask=ok[:, None] & (d[None, :] < H),
                        other=0.0).to(q.dtype)
        m_i, l_i, acc = sink_softmax_step(q, k, ok, m_i, l_i, acc, scale, INTERPRET, PREC)
    hmask = (heads[:, None] < N) & (d[None, :] < H)
    if not PARTIAL:
        out = acc / (l_i + tl.exp(sink - m_i))[:, None]
        tl.store(out_ptr + t * stride_ot + heads[:, None] * stride_on + d[None, :],
                 cast(out, out_ptr.dtype.element_ty, INTERPRET), mask=hmask)
    else:
        tl.store(part_ptr + t * stride_xt + split * stride_xs + heads[:, None] * stride_xn + d[None, :], acc,
                 mask=hmask)
        ml = ml_ptr + t * stride_mt + split * stride_ms + heads
        tl.store(ml, m_i, mask=heads < N)
        tl.store(ml + stride_mi, l_i, mask=heads < N)


@triton.jit
def _paged_merge_kernel(part_ptr, ml_ptr, sinks_ptr, out_ptr, N, H, SPLITS, stride_xt, stride_xs, stride_xn,
                         stride_mi, stride_mt, stride_ms, stride_ot, stride_on, BLOCK_N: tl.constexpr,
                         BLOCK_H: tl.constexpr, INTERPRET: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_H)
    hmask = (heads[:, None] < N) & (d[None, :] < H)
    # Start from the sink alone (max = sink, denominator 1); every split's max is >= the sink.
    m = tl.load(sinks_ptr + heads, mask=heads < N, other=0.0).to(tl.float32)
    den = tl.full([BLOCK_N], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    for s in range(SPLITS):
        ml = ml_ptr + t * stride_mt + s * stride_ms + heads
        m_s = tl.load(ml, mask=heads < N, other=0.0)
        l_s = tl.load(ml + stride_mi, mask=heads < N, other=0.0)
        a_s = tl.load(part_ptr + t * stride_xt + s * stride_xs + heads[:, None] * stride_xn + d[None, :], mask=hmask,
                      other=0.0)
        m_new = tl.maximum(m, m_s)
        alpha, beta = tl.exp(m - m_new), tl.exp(m_s - m_new)
        den = den * alpha + l_s * beta
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        m = m_new
    tl.store(out_ptr + t * stride_ot + heads[:, None] * stride_on + d[None, :],
             cast(acc / den[:, None], out_ptr.dtype.element_ty, INTERPRET), mask=hmask)


def num_sms(device: torch.device) -> int:
    """The device's SMs (4 in the interpreter: small grids that still split); the grids and splits follow it (the
    offline compile report sets the H100's 132)."""
    if device.type != "cuda":
        return 4
    return _sms_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=8)
def _sms_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def attention_splits(T: int, N: int, key_tiles: int, sms: int) -> int:
    """Key splits per (query, head tile): enough programs for about 2 per SM, at least 4 key tiles a split (host
    sizes only: a captured graph keeps its split)."""
    programs = T * triton.cdiv(N, 16)
    return max(1, min(2 * sms // programs, key_tiles // 4))


def triton_paged_sink_attention(q_TNH: torch.Tensor, window_PWH: torch.Tensor, slot_T: torch.Tensor,
                                pos_T: torch.Tensor, entries_BLcH: torch.Tensor | None,
                                table_TM: torch.Tensor | None, picks_TK: torch.Tensor | None,
                                visible_T: torch.Tensor | None, sinks_N: torch.Tensor, scale: float, *,
                                rope_dims: int = 0, num_splits: int | None = None) -> torch.Tensor:
    """Same contract as compressed_attention.reference_paged_sink_attention (fp8 entries and window rows: uint8 rows
    laid out by entry_rows(H, rope_dims)): out [T, N, H] in q's dtype. `num_splits` forces the key splits (tests), else
    attention_splits picks them from the host sizes."""
    common.check_dtype("q_TNH", q_TNH)
    T, N, H = q_TNH.shape
    window_only = entries_BLcH is None
    if window_only:  # a sliding layer: unread stand-ins, no entry visible
        entries_BLcH, table_TM, picks_TK, visible_T = window_PWH, slot_T[:, None], None, slot_T.new_zeros(T)
    fmt = entry_rows(H, rope_dims)
    fp8 = fmt if not window_only and is_fp8_pages(entries_BLcH) else None
    win_fp8 = fmt if is_fp8_pages(window_PWH) else None
    win_width = fmt.row_bytes if win_fp8 is not None else H
    width = fp8.row_bytes if fp8 is not None else win_width if window_only else H  # (the stand-in: the window)
    if (window_PWH.dim() != 3 or window_PWH.shape[2] != win_width or entries_BLcH.dim() != 3
            or entries_BLcH.shape[2] != width
            or table_TM.dim() != 2 or table_TM.shape[0] != T or slot_T.shape != (T,) or pos_T.shape != (T,)
            or visible_T.shape != (T,) or sinks_N.shape != (N,)
            or (picks_TK is not None and (picks_TK.dim() != 2 or picks_TK.shape[0] != T))):
        raise ValueError(f"window_PWH {tuple(window_PWH.shape)}, entries_BLcH {tuple(entries_BLcH.shape)}, table_TM "
                         f"{tuple(table_TM.shape)}, picks_TK {None if picks_TK is None else tuple(picks_TK.shape)}, "
                         f"slot_T / pos_T / visible_T and sinks_N {tuple(sinks_N.shape)} are invalid: must be "
                         f"[P, W, {win_width}], [B, Lc, {width}], [{T}, M], [{T}, K] or None, [{T}] each and "
                         f"[{N}].")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits={num_splits} is invalid: must be >= 1.")
    dev = q_TNH.device
    out = common.workspace((T, N, H), q_TNH.dtype, dev)
    if T == 0:
        return out
    q = q_TNH if q_TNH.stride(-1) == 1 else q_TNH.contiguous()
    win = window_PWH if window_PWH.stride(-1) == 1 else window_PWH.contiguous()
    pages = entries_BLcH if entries_BLcH.stride(-1) == 1 else entries_BLcH.contiguous()
    p8, ps, pr = fp8_page_args(pages, fp8)[:3]
    w8, ws, wr = fp8_page_args(win, win_fp8)[:3]
    nope, rope, group, s0, r0 = fmt.nope, fmt.rope, fmt.group, fmt.scale_offset, fmt.rope_offset  # (unread if float)
    table = table_TM.to(torch.int32)
    picks = picks_TK.to(torch.int32) if picks_TK is not None else table  # (unread without picks)
    W, Lc = win.shape[1], pages.shape[1]
    KE = 0 if window_only else picks_TK.shape[1] if picks_TK is not None else table.shape[1] * Lc
    interp = common.interpreting(q)
    # the smallest tl.dot tile: V4's 64 / 128 heads are 4 / 8 programs per query (triton_compressed_attention's)
    block_n = 16
    block_h = max(16, triton.next_power_of_2(H))
    block_s = 16 if interp else (32 if block_h >= 256 else 64)
    sms = num_sms(dev)
    splits = num_splits or attention_splits(T, N, triton.cdiv(W, block_s) + triton.cdiv(KE, block_s), sms)
    part = ml = out  # (unwritten with one split)
    if splits > 1:
        part = common.workspace((T, splits, N, H), torch.float32, dev)
        ml = common.workspace((2, T, splits, N), torch.float32, dev)
    sinks = sinks_N.float().contiguous()
    heads = triton.cdiv(N, block_n)
    _paged_sink_attention_kernel[(T, heads, splits)](
        q, w8, ws, wr, slot_T.to(torch.int32), pos_T.to(torch.int32), p8, ps, pr, table, picks,
        visible_T.to(torch.int32), sinks, out, part, ml, float(scale), N, H, W, KE, Lc, nope, rope, s0, r0,
        q.stride(0), q.stride(1), win.stride(0), win.stride(1),
        pages.stride(0), pages.stride(1), table.stride(0), picks.stride(0), out.stride(0), out.stride(1),
        part.stride(0), part.stride(1), part.stride(2), ml.stride(0), ml.stride(1), ml.stride(2), splits,
        GROUP=group, FP8=fp8 is not None, WIN_FP8=win_fp8 is not None, PICKS=picks_TK is not None,
        PARTIAL=splits > 1, BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_S=block_s, INTERPRET=interp,
        PREC=common.dot_precision(q.dtype), num_warps=4 if block_h <= 128 else 8)
    if splits > 1:
        _paged_merge_kernel[(T, heads)](
            part, ml, sinks, out, N, H, splits, part.stride(0), part.stride(1), part.stride(2), ml.stride(0),
            ml.stride(1), ml.stride(2), out.stride(0), out.stride(1), BLOCK_N=block_n, BLOCK_H=block_h,
            INTERPRET=interp, num_warps=4 if block_h <= 128 else 8)
    return out


__all__ = ["attention_splits", "fp8_page_args", "load_fp8_rows", "num_sms", "triton_paged_compressed_indexer_topk",
           "triton_paged_sink_attention"]
