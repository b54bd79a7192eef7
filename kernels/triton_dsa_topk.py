"""DeepSeek Sparse Attention's selection in Triton: the lightning indexer's scores, then the top-k per query over its
causal range. Same contract as dsa.reference_dsa_topk (legend there: T, H, D, K, W, L).

Two launches per slice of query rows:
- scores (grid: rows x G): G programs per query token share its key tiles of BLOCK_N positions (G from the batch and
  the SM count only: about 4 programs per SM), each loading the token's [H, D] queries once and reading every key
  of its tiles through the block table once for all H heads: s = relu(scale * q [H, D] @ k^T [D, BLOCK_N]), then
  score = weights [H] . s, stored float32 into a [rows, W] workspace (-0.0 stored as 0.0); the loop ends at the
  token's causal length, so the work follows the device lengths while the grid follows the batch;
- top-k (grid: rows): a row with n <= K positions selects them all; else a radix select over the order-preserving
  32-bit image of the float scores finds the K-th largest value thr digit by digit (11, 11 and 10 bits: three passes
  over the row, each a histogram of the keys that share the digits found so far), then one pass writes the positions
  above thr and, in position order, the first K - count positions equal to thr (ties keep the lowest positions, as
  the reference). Output: K positions per row (in that order, not sorted), or n then -1.

No host length enters: W is the host bound for multi-token steps and `max_len` (max_model_len) for decode steps, whose
host lengths are placeholders inside a decode graph. Rows are sliced so that a workspace stays under
_WORKSPACE_BYTES (a prefill chunk of thousands of queries over a long context).

Cost, per query and layer: the scores read n keys of D values (the dense MLA it replaces reads n latents of C + P:
128 vs 576 values for DeepSeek-V3.2) and the selection 4 passes over n float32 scores (from L2 for rows of up to a
few MB). One program per row: at batch 1 a 128k-token row is one SM's work (4 x 512 KB from L2); a multi-program
select per row (histograms merged by atomics) is what a small long-context batch would want next.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .attention import AttentionMetadata
from .dsa import check_index_inputs
from .triton_common import dot

_WORKSPACE_BYTES = 256 << 20
# (BLOCK_N, num_warps) of the scores kernel; the top-k kernel's tile and warps.
_SCORE_CONFIG = (64, 4)
_TOPK_CONFIG = (4096, 8)  # sm_90, Triton 3.6: 213 registers, no spills (1024 x 4 warps: 255; 1024 x 8: 128)


@triton.jit
def _seq_of_token(qsl_ptr, num_seqs, tok):
    """The sequence of flat token `tok`: the first s whose queries end after it (binary search, device only)."""
    lo = tok * 0
    hi = lo + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(qsl_ptr + mid + 1) <= tok:
            lo = mid + 1
        else:
            hi = mid
    return lo


@triton.jit
def _causal_len(qsl_ptr, seq_lens_ptr, s_idx, tok):
    q_start = tl.load(qsl_ptr + s_idx)
    q_len = tl.load(qsl_ptr + s_idx + 1) - q_start
    return tl.load(seq_lens_ptr + s_idx) - q_len + (tok - q_start) + 1


@triton.jit(do_not_specialize=["num_seqs", "tok0", "G"])
def _index_scores_kernel(q_ptr, w_ptr, cache_ptr, tables_ptr, seq_lens_ptr, qsl_ptr, scores_ptr, scale, num_seqs,
                         tok0, G, stride_qt, stride_qh, stride_wt, stride_cb, stride_cl, stride_tb, stride_st, H, D,
                         L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         INTERPRET: tl.constexpr, PREC: tl.constexpr):
    row = tl.program_id(0)
    tok = tok0 + row
    s_idx = _seq_of_token(qsl_ptr, num_seqs, tok)
    if s_idx >= num_seqs:
        return
    n = _causal_len(qsl_ptr, seq_lens_ptr, s_idx, tok)
    tok64 = tok.to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + tok64 * stride_qt + h[:, None] * stride_qh + d[None, :], mask=(h[:, None] < H) & (d[None, :] < D),
                other=0.0)
    w = tl.load(w_ptr + tok64 * stride_wt + h, mask=h < H, other=0.0).to(tl.float32)
    table_ptr = tables_ptr + s_idx.to(tl.int64) * stride_tb
    out_ptr = scores_ptr + row.to(tl.int64) * stride_st
    # G programs share the row's key tiles (tile j to program j % G): the work follows the device length, the grid
    # only the batch (a decode graph's is fixed).
    for t in range(tl.program_id(1), tl.cdiv(n, BLOCK_N), G):
        pos = t * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = pos < n
        blk = tl.load(table_ptr + pos // L, mask=ok, other=0).to(tl.int64)
        slot = blk * stride_cb + (pos % L) * stride_cl
        # An fp8 key widens exactly to the query's dtype (stored at scale 1.0).
        k = tl.load(cache_ptr + slot[:, None] + d[None, :], mask=ok[:, None] & (d[None, :] < D), other=0.0).to(q.dtype)
        s = dot(q, tl.trans(k), tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32), INTERPRET, PREC)
        s = tl.maximum(s * scale, 0.0)
        score = tl.sum(w[:, None] * s, axis=0)
        score = tl.where(score == 0.0, 0.0, score)  # -0.0 (negative weights times relu 0) counts as 0.0
        tl.store(out_ptr + pos, score, mask=ok)


@triton.jit
def _order_key(x):
    """int64 keys in [0, 2^32) ordered as the float32 values x (IEEE bits, negatives' magnitude bits flipped, then
    offset so that the order is unsigned: radix digits are plain bit fields)."""
    b = x.to(tl.int32, bitcast=True)
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648


@triton.jit
def _digit_pass(src, n, want, prefix, SHIFT: tl.constexpr, BITS: tl.constexpr, PSHIFT: tl.constexpr,
                BLOCK: tl.constexpr):
    """One radix pass over the row: among the keys whose bits above PSHIFT equal `prefix` (all keys for PSHIFT 32),
    the histogram of their BITS-bit digit at SHIFT; returns (the digit holding the want-th largest of them, how many
    of them lie in higher digits)."""
    NB: tl.constexpr = 1 << BITS
    offs = tl.arange(0, BLOCK)
    hist = tl.zeros([NB], tl.int32)
    for s0 in range(0, n, BLOCK):
        pos = s0 + offs
        ok = pos < n
        key = _order_key(tl.load(src + pos, mask=ok, other=0.0))
        if PSHIFT < 32:
            ok = ok & ((key >> PSHIFT) == prefix)
        hist += tl.histogram(((key >> SHIFT) & (NB - 1)).to(tl.int32), NB, mask=ok)
    at_least = tl.cumsum(hist, axis=0, reverse=True)  # [d]: keys with digit >= d
    digit = tl.sum((at_least >= want).to(tl.int32), axis=0) - 1
    above = tl.sum(tl.where(tl.arange(0, NB) > digit, hist, 0), axis=0)
    return digit.to(tl.int64), above


@triton.jit(do_not_specialize=["num_seqs", "tok0"])
def _topk_kernel(scores_ptr, seq_lens_ptr, qsl_ptr, out_ptr, num_seqs, tok0, stride_st, stride_ot, K,
                 BLOCK: tl.constexpr):
    row = tl.program_id(0)
    tok = tok0 + row
    s_idx = _seq_of_token(qsl_ptr, num_seqs, tok)
    if s_idx >= num_seqs:
        return
    n = _causal_len(qsl_ptr, seq_lens_ptr, s_idx, tok)
    out_row = out_ptr + tok.to(tl.int64) * stride_ot
    src = scores_ptr + row.to(tl.int64) * stride_st
    offs = tl.arange(0, BLOCK)
    if n <= K:  # every causal position
        for s0 in range(0, K, BLOCK):
            o = s0 + offs
            tl.store(out_row + o, tl.where(o < n, o, -1).to(tl.int32), mask=o < K)
        return
    # thr, the K-th largest key, digit by digit (11 + 11 + 10 bits): each pass keeps the keys that share the digits
    # found so far and finds the next digit from their histogram.
    d1, above1 = _digit_pass(src, n, K, 0, 21, 11, 32, BLOCK)
    d2, above2 = _digit_pass(src, n, K - above1, d1, 10, 11, 21, BLOCK)
    d3, above3 = _digit_pass(src, n, K - above1 - above2, (d1 << 11) | d2, 0, 10, 10, BLOCK)
    thr = (d1 << 21) | (d2 << 10) | d3
    above = above1 + above2 + above3  # keys > thr: all selected; then the first K - above keys == thr
    n_gt = tl.zeros([], tl.int32)
    n_eq = tl.zeros([], tl.int32)
    for s0 in range(0, n, BLOCK):
        pos = s0 + offs
        ok = pos < n
        key = _order_key(tl.load(src + pos, mask=ok, other=0.0))
        gt = ((key > thr) & ok).to(tl.int32)
        eq = ((key == thr) & ok).to(tl.int32)
        gt_at = n_gt + tl.cumsum(gt, axis=0) - 1
        eq_at = above + n_eq + tl.cumsum(eq, axis=0) - 1
        tl.store(out_row + gt_at, pos.to(tl.int32), mask=gt > 0)
        tl.store(out_row + eq_at, pos.to(tl.int32), mask=(eq > 0) & (eq_at < K))
        n_gt += tl.sum(gt, axis=0)
        n_eq += tl.sum(eq, axis=0)


def triton_dsa_topk(q_THD: torch.Tensor, weights_TH: torch.Tensor, index_cache_BLD: torch.Tensor,
                    meta: AttentionMetadata, topk: int, scale: float, max_len: int | None = None) -> torch.Tensor:
    """Same contract as `reference_dsa_topk`: int32 [T, topk] selected positions (any order), then -1. No host
    sync; decode steps score `max_len` positions wide (their host lengths may be a graph's placeholders)."""
    common.check_dtype("q_THD", q_THD)
    check_index_inputs(q_THD, weights_TH, index_cache_BLD)
    T, H, D = q_THD.shape
    dev = q_THD.device
    out = common.workspace((T, topk), torch.int32, dev)
    if T == 0:
        return out
    if meta.max_query_len == 1 and max_len is not None:
        W = max_len
    else:
        W = meta.max_seq_len if max_len is None else min(meta.max_seq_len, max_len)
    q_THD = q_THD if q_THD.stride(-1) == 1 else q_THD.contiguous()
    weights_TH = weights_TH.contiguous()
    interp = common.interpreting(q_THD)
    block_n, warps = (16, 4) if interp else _SCORE_CONFIG
    block_t, t_warps = (64, 4) if interp else _TOPK_CONFIG
    Wp = triton.cdiv(W, block_n) * block_n
    rows = max(1, min(T, _WORKSPACE_BYTES // (4 * Wp)))
    scores = common.workspace((rows, Wp), torch.float32, dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
    for t0 in range(0, T, rows):
        r = min(rows, T - t0)
        G = min(Wp // block_n, triton.cdiv(4 * sms, r))  # about 4 programs per SM, from the batch only
        _index_scores_kernel[(r, G)](
            q_THD, weights_TH, index_cache_BLD, meta.block_tables_SM, meta.seq_lens_S, meta.query_start_loc_S1, scores,
            scale, meta.num_seqs, t0, G, q_THD.stride(0), q_THD.stride(1), weights_TH.stride(0), index_cache_BLD.stride(0),
            index_cache_BLD.stride(1), meta.block_tables_SM.stride(0), scores.stride(0), H, D, L=index_cache_BLD.shape[1],
            BLOCK_H=max(16, triton.next_power_of_2(H)), BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_N=block_n,
            INTERPRET=interp, PREC=common.dot_precision(q_THD.dtype), num_warps=warps)
        _topk_kernel[(r,)](scores, meta.seq_lens_S, meta.query_start_loc_S1, out, meta.num_seqs, t0, scores.stride(0),
                           out.stride(0), topk, BLOCK=block_t, num_warps=t_warps)
    return out


__all__ = ["triton_dsa_topk"]
