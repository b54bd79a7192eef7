"""DeepSeek Sparse Attention's selection in Triton: the lightning indexer's scores, then the top-k per query over its
causal range. Same contract as dsa.reference_dsa_topk (legend there: T, H, D, K, W, L).

Two launches per slice of query rows:
- scores (grid: rows x key tiles of BLOCK_N): a program scores BLOCK_N positions of one query token, reading their
  keys through the block table once for all H heads: s = relu(scale * q [H, D] @ k^T [D, BLOCK_N]), then
  score = weights [H] . s, stored float32 into a [rows, W] workspace (-0.0 stored as 0.0); tiles past the token's
  causal length return at once, so the work follows the device lengths while the grid follows W;
- top-k (grid: rows): a row with n <= K positions selects them all; else a bisection over the order-preserving int32
  image of the float scores finds the K-th largest value thr in 32 passes over the row (count(score >= mid) >= K),
  then one pass counts the scores above thr and one writes their positions and, in position order, the first
  K - count positions equal to thr (ties keep the lowest positions, as the reference). Output: K positions per row
  (in that order, not sorted), or n then -1.

No host length enters: W is the host bound for multi-token steps and `max_len` (max_model_len) for decode steps, whose
host lengths are placeholders inside a decode graph. Rows are sliced so that a workspace stays under
_WORKSPACE_BYTES (a prefill chunk of thousands of queries over a long context).

Cost, per query and layer: the scores read n keys of D values (the dense MLA it replaces reads n latents of C + P:
128 vs 576 values for DeepSeek-V3.2) and the selection 34 passes over n float32 scores, from L2 for rows up to some
MB. A radix select (four 8-bit passes with histograms) would take ~5 passes: a later optimisation.
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
_TOPK_CONFIG = (1024, 4)


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


@triton.jit(do_not_specialize=["num_seqs", "tok0"])
def _index_scores_kernel(q_ptr, w_ptr, cache_ptr, tables_ptr, seq_lens_ptr, qsl_ptr, scores_ptr, scale, num_seqs,
                         tok0, stride_qt, stride_qh, stride_wt, stride_cb, stride_cl, stride_tb, stride_st, H, D,
                         L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         INTERPRET: tl.constexpr, PREC: tl.constexpr):
    row = tl.program_id(0)
    tok = tok0 + row
    s_idx = _seq_of_token(qsl_ptr, num_seqs, tok)
    if s_idx >= num_seqs:
        return
    n = _causal_len(qsl_ptr, seq_lens_ptr, s_idx, tok)
    start = tl.program_id(1) * BLOCK_N
    if start >= n:
        return  # past the token's causal range: nothing to score (the top-k never reads there)
    tok64 = tok.to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + tok64 * stride_qt + h[:, None] * stride_qh + d[None, :], mask=(h[:, None] < H) & (d[None, :] < D),
                other=0.0)
    w = tl.load(w_ptr + tok64 * stride_wt + h, mask=h < H, other=0.0).to(tl.float32)
    pos = start + tl.arange(0, BLOCK_N)
    ok = pos < n
    blk = tl.load(tables_ptr + s_idx.to(tl.int64) * stride_tb + pos // L, mask=ok, other=0).to(tl.int64)
    slot = blk * stride_cb + (pos % L) * stride_cl
    # An fp8 key widens exactly to the query's dtype (stored at scale 1.0).
    k = tl.load(cache_ptr + slot[:, None] + d[None, :], mask=ok[:, None] & (d[None, :] < D), other=0.0).to(q.dtype)
    s = dot(q, tl.trans(k), tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32), INTERPRET, PREC)
    s = tl.maximum(s * scale, 0.0)
    score = tl.sum(w[:, None] * s, axis=0)
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 (negative weights times relu 0) counts as 0.0
    tl.store(scores_ptr + row.to(tl.int64) * stride_st + pos, score, mask=ok)


@triton.jit
def _order_key(x):
    """int64 keys ordered as the float32 values x (IEEE bits, negatives' magnitude bits flipped)."""
    b = x.to(tl.int32, bitcast=True)
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).to(tl.int64)


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
    # thr: the largest key t with count(key >= t) >= K. Invariant: count(lo) >= K > count(hi).
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483648, tl.int64)
    for _ in range(32):
        mid = lo + (hi - lo) // 2
        cnt = tl.zeros([], tl.int32)
        for s0 in range(0, n, BLOCK):
            pos = s0 + offs
            ok = pos < n
            key = _order_key(tl.load(src + pos, mask=ok, other=0.0))
            cnt += tl.sum(((key >= mid) & ok).to(tl.int32), axis=0)
        lo = tl.where(cnt >= K, mid, lo)
        hi = tl.where(cnt >= K, hi, mid)
    thr = lo
    above = tl.zeros([], tl.int32)
    for s0 in range(0, n, BLOCK):
        pos = s0 + offs
        ok = pos < n
        key = _order_key(tl.load(src + pos, mask=ok, other=0.0))
        above += tl.sum(((key > thr) & ok).to(tl.int32), axis=0)
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
    for t0 in range(0, T, rows):
        r = min(rows, T - t0)
        _index_scores_kernel[(r, Wp // block_n)](
            q_THD, weights_TH, index_cache_BLD, meta.block_tables_SM, meta.seq_lens_S, meta.query_start_loc_S1, scores,
            scale, meta.num_seqs, t0, q_THD.stride(0), q_THD.stride(1), weights_TH.stride(0), index_cache_BLD.stride(0),
            index_cache_BLD.stride(1), meta.block_tables_SM.stride(0), scores.stride(0), H, D, L=index_cache_BLD.shape[1],
            BLOCK_H=max(16, triton.next_power_of_2(H)), BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_N=block_n,
            INTERPRET=interp, PREC=common.dot_precision(q_THD.dtype), num_warps=warps)
        _topk_kernel[(r,)](scores, meta.seq_lens_S, meta.query_start_loc_S1, out, meta.num_seqs, t0, scores.stride(0),
                           out.stride(0), topk, BLOCK=block_t, num_warps=t_warps)
    return out


__all__ = ["triton_dsa_topk"]
