"""The lightning indexer's top-k in Triton (DeepSeek Sparse Attention): per query row, the K positions of highest
score among its first n (kernels/dsa.reference_topk_positions' contract: ties to the lowest positions; any order).
triton_dsa_topk.py computes the score rows and picks the path; this module holds the selection kernels.

One select (`_select`): a radix select over the order-preserving 32-bit image of the float scores finds the K-th
largest value thr digit by digit (11, 11 and 10 bits: three passes over the values, each a histogram of the keys
that share the digits found so far), then one pass writes the positions above thr and, in scan order, the first
K - count positions equal to thr.

Two paths, chosen by context length (`split_programs`):
- one program per row (`_topk_kernel`): four passes over the row; at batch 1 and 128k context one SM's work;
- P programs per row (`_partial_topk_kernel`, then `_merge_topk_kernel`): program p selects the top K of its span of
  cdiv(n, P) positions into a [P, K] candidate list (positions and scores; -1 past a short span's count), and one
  program per row selects the top K of the P * K candidates. Exact: the final selection is the top K under the
  total order (score descending, position ascending), and each of its members is in its own span's top K under the
  same order; the candidates of one value sit in position order (spans ascending; within a span a value's
  candidates are all above its threshold or all equal to it, each part written in position order), so the merge's
  ties keep the lowest positions too. A row of n <= K writes its positions at once (the merge program); a row of
  n <= P * K has spans of at most K, which the partials copy whole, packed, so the merge selects over the row's n
  scores (a decode graph's P follows max_model_len, a host bound: a short row costs what one program per row costs,
  plus a parallel copy). Work per row: n / P in each partial, P * K in the merge; P ~ sqrt(n / K) balances them
  (8 at 128k context, K = 2048: 4 passes over 16k values per program, where one program makes 4 over 128k).
"""
from __future__ import annotations

import math

import triton
import triton.language as tl

from .triton_common import causal_len, seq_of_token

# Rows narrower than this select in one program per row (the partials' launch and the merge's extra pass cost more
# than a few passes over a short row); P is capped so that a merge reads at most _MAX_SPLITS * K candidates.
SPLIT_MIN_WIDTH = 16384
_MAX_SPLITS = 16


def split_programs(width: int, topk: int, rows: int, sms: int) -> int:
    """Programs per row for `rows` rows of up to `width` scores: about sqrt(width / topk) (the partials' and the
    merge's work balanced), as many as leave the SMs two rows' programs each at most; 1 (one program per row) for
    short rows or a batch that fills the SMs alone. From host bounds only (a decode graph's `max_len`)."""
    if width < max(SPLIT_MIN_WIDTH, 4 * topk):
        return 1
    p = min(math.isqrt(width // topk), _MAX_SPLITS, max(1, 2 * sms // max(rows, 1)))
    return p if p >= 2 else 1


@triton.jit
def _row_token(qsl_ptr, num_seqs, tok0):
    """(row, tok, s_idx) of a program over rows of flat tokens tok0..: its row (program_id 0), the row's token and
    the token's sequence (num_seqs past the batch's last token: the program has nothing to do)."""
    row = tl.program_id(0)
    tok = tok0 + row
    return row, tok, seq_of_token(qsl_ptr, num_seqs, tok)


@triton.jit
def _order_key(x):
    """int64 keys in [0, 2^32) ordered as the float32 values x (IEEE bits, negatives' magnitude bits flipped, then
    offset so that the order is unsigned: radix digits are plain bit fields)."""
    b = x.to(tl.int32, bitcast=True)
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648


@triton.jit
def _load_keys(val_ptr, pos_ptr, i, n, HAS_POS: tl.constexpr):
    """Keys and validity of entries i (< n; with HAS_POS, entries whose position is -1 are not there)."""
    ok = i < n
    if HAS_POS:
        ok = ok & (tl.load(pos_ptr + i, mask=ok, other=-1) >= 0)
    return _order_key(tl.load(val_ptr + i, mask=ok, other=0.0)), ok


@triton.jit
def _digit_pass(val_ptr, pos_ptr, n, want, prefix, SHIFT: tl.constexpr, BITS: tl.constexpr, PSHIFT: tl.constexpr,
                HAS_POS: tl.constexpr, BLOCK: tl.constexpr):
    """One radix pass: among the keys whose bits above PSHIFT equal `prefix` (all keys for PSHIFT 32), the histogram
    of their BITS-bit digit at SHIFT; returns (the digit holding the want-th largest of them, how many of them lie
    in higher digits)."""
    NB: tl.constexpr = 1 << BITS
    offs = tl.arange(0, BLOCK)
    hist = tl.zeros([NB], tl.int32)
    for s0 in range(0, n, BLOCK):
        key, ok = _load_keys(val_ptr, pos_ptr, s0 + offs, n, HAS_POS)
        if PSHIFT < 32:
            ok = ok & ((key >> PSHIFT) == prefix)
        hist += tl.histogram(((key >> SHIFT) & (NB - 1)).to(tl.int32), NB, mask=ok)
    at_least = tl.cumsum(hist, axis=0, reverse=True)  # [d]: keys with digit >= d
    digit = tl.sum((at_least >= want).to(tl.int32), axis=0) - 1
    above = tl.sum(tl.where(tl.arange(0, NB) > digit, hist, 0), axis=0)
    return digit.to(tl.int64), above


@triton.jit
def _select(val_ptr, pos_ptr, n, K, base, out_pos_ptr, out_val_ptr, HAS_POS: tl.constexpr, WRITE_VAL: tl.constexpr,
            BLOCK: tl.constexpr):
    """The K largest of the n values at val_ptr (at least K of them valid), ties to the earliest entries: writes K
    positions to out_pos_ptr (pos_ptr[i] with HAS_POS, else base + i) and, with WRITE_VAL, their values to
    out_val_ptr, the entries above the K-th value first, then those equal to it."""
    d1, above1 = _digit_pass(val_ptr, pos_ptr, n, K, 0, 21, 11, 32, HAS_POS, BLOCK)
    d2, above2 = _digit_pass(val_ptr, pos_ptr, n, K - above1, d1, 10, 11, 21, HAS_POS, BLOCK)
    d3, above3 = _digit_pass(val_ptr, pos_ptr, n, K - above1 - above2, (d1 << 11) | d2, 0, 10, 10, HAS_POS, BLOCK)
    thr = (d1 << 21) | (d2 << 10) | d3
    above = above1 + above2 + above3  # keys > thr: all selected; then the first K - above keys == thr
    offs = tl.arange(0, BLOCK)
    n_gt = tl.zeros([], tl.int32)
    n_eq = tl.zeros([], tl.int32)
    for s0 in range(0, n, BLOCK):
        i = s0 + offs
        key, ok = _load_keys(val_ptr, pos_ptr, i, n, HAS_POS)
        if HAS_POS:
            pos = tl.load(pos_ptr + i, mask=ok, other=-1)
        else:
            pos = base + i
        gt = ((key > thr) & ok).to(tl.int32)
        eq = ((key == thr) & ok).to(tl.int32)
        gt_at = n_gt + tl.cumsum(gt, axis=0) - 1
        eq_at = above + n_eq + tl.cumsum(eq, axis=0) - 1
        take_eq = (eq > 0) & (eq_at < K)
        tl.store(out_pos_ptr + gt_at, pos.to(tl.int32), mask=gt > 0)
        tl.store(out_pos_ptr + eq_at, pos.to(tl.int32), mask=take_eq)
        if WRITE_VAL:
            v = tl.load(val_ptr + i, mask=ok, other=0.0)
            tl.store(out_val_ptr + gt_at, v, mask=gt > 0)
            tl.store(out_val_ptr + eq_at, v, mask=take_eq)
        n_gt += tl.sum(gt, axis=0)
        n_eq += tl.sum(eq, axis=0)


@triton.jit
def _write_all(out_row, n, K, BLOCK: tl.constexpr):
    """A row of n <= K positions selects them all: 0..n-1, then -1."""
    offs = tl.arange(0, BLOCK)
    for s0 in range(0, K, BLOCK):
        o = s0 + offs
        tl.store(out_row + o, tl.where(o < n, o, -1).to(tl.int32), mask=o < K)


@triton.jit
def _select_row(val_ptr, pos_ptr, at, m, n, K, out_row, HAS_POS: tl.constexpr, BLOCK: tl.constexpr):
    """A row's K positions into out_row: a row of n <= K selects them all (0..n-1, then -1), a longer one the top K
    of the m values at val_ptr + at (`_select`: positions pos_ptr[at + i] with HAS_POS, else i)."""
    if n <= K:
        _write_all(out_row, n, K, BLOCK)
    else:
        _select(val_ptr + at, pos_ptr + at, m, K, 0, out_row, out_row, HAS_POS, False, BLOCK)


@triton.jit(do_not_specialize=["num_seqs", "tok0"])
def _topk_kernel(scores_ptr, seq_lens_ptr, qsl_ptr, out_ptr, num_seqs, tok0, stride_st, stride_ot, K,
                 BLOCK: tl.constexpr):
    """One program per row (grid: rows)."""
    row, tok, s_idx = _row_token(qsl_ptr, num_seqs, tok0)
    if s_idx >= num_seqs:
        return
    n = causal_len(qsl_ptr, seq_lens_ptr, s_idx, tok)
    _select_row(scores_ptr, scores_ptr, row.to(tl.int64) * stride_st, n, n, K, out_ptr + tok.to(tl.int64) * stride_ot,
                False, BLOCK)


@triton.jit(do_not_specialize=["num_seqs", "tok0", "P"])
def _partial_topk_kernel(scores_ptr, seq_lens_ptr, qsl_ptr, cand_pos_ptr, cand_val_ptr, num_seqs, tok0, P, stride_st,
                         stride_ct, K, BLOCK: tl.constexpr):
    """Grid (rows, P): program p's span's top K into candidates [row, p, :K] (module docstring)."""
    row, tok, s_idx = _row_token(qsl_ptr, num_seqs, tok0)
    if s_idx >= num_seqs:
        return
    n = causal_len(qsl_ptr, seq_lens_ptr, s_idx, tok)
    if n <= K:  # the merge program writes every position
        return
    p = tl.program_id(1)
    span = tl.cdiv(n, P)
    lo = p * span
    m = tl.minimum(span, n - lo)  # < 1 for a program past a short row's end: its candidates are all -1
    src = scores_ptr + row.to(tl.int64) * stride_st + lo
    # A row of n <= P * K has spans of at most K: copied whole and packed (the candidates are the row, n of them, no
    # holes); a longer row's span p fills slots [p * K, (p + 1) * K), a short last span padded with -1.
    packed = n <= P * K
    cand = row.to(tl.int64) * stride_ct + tl.where(packed, p * span, p * K)
    if m <= K:
        width = tl.where(packed, m, K)
        offs = tl.arange(0, BLOCK)
        for s0 in range(0, K, BLOCK):
            o = s0 + offs
            tl.store(cand_pos_ptr + cand + o, tl.where(o < m, lo + o, -1).to(tl.int32), mask=o < width)
            tl.store(cand_val_ptr + cand + o, tl.load(src + o, mask=o < m, other=0.0), mask=o < width)
        return
    _select(src, src, m, K, lo, cand_pos_ptr + cand, cand_val_ptr + cand, False, True, BLOCK)


@triton.jit(do_not_specialize=["num_seqs", "tok0", "P"])
def _merge_topk_kernel(seq_lens_ptr, qsl_ptr, cand_pos_ptr, cand_val_ptr, out_ptr, num_seqs, tok0, P, stride_ct,
                       stride_ot, K, BLOCK: tl.constexpr):
    """Grid (rows,): a row's top K from its P * K candidates (one select instance: a second over the score row
    doubled the cold compile to 8.7 s)."""
    row, tok, s_idx = _row_token(qsl_ptr, num_seqs, tok0)
    if s_idx >= num_seqs:
        return
    n = causal_len(qsl_ptr, seq_lens_ptr, s_idx, tok)
    n_cand = tl.where(n <= P * K, n, P * K)  # a short row's candidates are the row itself, packed
    _select_row(cand_val_ptr, cand_pos_ptr, row.to(tl.int64) * stride_ct, n_cand, n, K,
                out_ptr + tok.to(tl.int64) * stride_ot, True, BLOCK)


__all__ = ["SPLIT_MIN_WIDTH", "split_programs"]
