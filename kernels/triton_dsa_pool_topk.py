"""GLM-5.3-Flash's pooled DSA selection in Triton (same contract as dsa.reference_dsa_pool_topk; legend there: T, H,
D, K, W, L; KP the pool size, a power of two).

Per slice of query rows, three launches:
- pool scores (grid: rows x G): G programs per query token share its pools, BLOCK_P at a time; each reads the
  pools' KP cache rows [key | gate] through the block table one token at a time, making the pools' keys by a running
  softmax over the tokens of gate + ape, per channel, in float32 ([BLOCK_P, D] tiles), and scores them against the token's [H, D] queries in one dot, relu(scale * s),
  weighted by the token's [H] weights, into a [rows, W / KP] float32 workspace; only the token's complete pools
  (its causal length // KP) are read, so the work follows the device lengths;
- the top K / KP pools per row (triton_dsa_select's radix select, one program per row; ties to the lowest pool);
- their tokens and the row's incomplete pool's, expanded into the output row by the same program after a barrier.

No host length enters (W is the host bound for multi-token steps and max_len for decode steps, as
triton_dsa_topk.py). Rows are sliced so that a workspace stays under _WORKSPACE_BYTES.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .attention import AttentionMetadata
from .triton_common import causal_len, dot
from .triton_dsa_select import _row_token, _select_row

_WORKSPACE_BYTES = 256 << 20
# (BLOCK_P, num_warps) of the scores kernel; the select kernel's tile and warps.
_SCORE_CONFIG = (16, 4)
_TOPK_CONFIG = (1024, 4)


@triton.jit(do_not_specialize=["num_seqs", "tok0", "G"])
def _pool_scores_kernel(q_ptr, w_ptr, cache_ptr, ape_ptr, tables_ptr, seq_lens_ptr, qsl_ptr, scores_ptr, scale,
                        num_seqs, tok0, G, stride_qt, stride_qh, stride_wt, stride_cb, stride_cl, stride_tb, stride_st,
                        H, D, L: tl.constexpr, KP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_P: tl.constexpr, INTERPRET: tl.constexpr):
    row, tok, s_idx = _row_token(qsl_ptr, num_seqs, tok0)
    if s_idx >= num_seqs:
        return
    m = causal_len(qsl_ptr, seq_lens_ptr, s_idx, tok) // KP  # the token's complete pools
    tok64 = tok.to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(q_ptr + tok64 * stride_qt + h[:, None] * stride_qh + d[None, :], mask=(h[:, None] < H) & dmask[None, :],
                other=0.0).to(tl.float32)
    w = tl.load(w_ptr + tok64 * stride_wt + h, mask=h < H, other=0.0).to(tl.float32)
    table_ptr = tables_ptr + s_idx.to(tl.int64) * stride_tb
    out_ptr = scores_ptr + row.to(tl.int64) * stride_st
    for t in range(tl.program_id(1), tl.cdiv(m, BLOCK_P), G):
        p = t * BLOCK_P + tl.arange(0, BLOCK_P)
        okp = p < m
        ok2 = okp[:, None] & dmask[None, :]
        # The pools' keys, token by token: a running softmax over the pool's tokens, per channel ([BLOCK_P, D] tiles).
        mx = tl.full([BLOCK_P, BLOCK_D], float("-inf"), dtype=tl.float32)
        den = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        for jj in range(KP):
            pos = p * KP + jj
            blk = tl.load(table_ptr + pos // L, mask=okp, other=0).to(tl.int64)
            at = cache_ptr + (blk * stride_cb + (pos % L) * stride_cl)[:, None] + d[None, :]
            key = tl.load(at, mask=ok2, other=0.0).to(tl.float32)
            ape = tl.load(ape_ptr + jj * D + d, mask=dmask, other=0.0).to(tl.float32)
            logit = tl.load(at + D, mask=ok2, other=0.0).to(tl.float32) + ape[None, :]
            new_mx = tl.maximum(mx, logit)
            keep = tl.exp(mx - new_mx)
            e = tl.exp(logit - new_mx)
            den = den * keep + e
            acc = acc * keep + e * key
            mx = new_mx
        pool = acc / den
        s = dot(q, tl.trans(pool), tl.zeros([BLOCK_H, BLOCK_P], dtype=tl.float32), INTERPRET, "ieee")
        score = tl.sum(w[:, None] * tl.maximum(s * scale, 0.0), axis=0)
        score = tl.where(score == 0.0, 0.0, score)  # -0.0 counts as 0.0
        tl.store(out_ptr + p, score, mask=okp)


@triton.jit(do_not_specialize=["num_seqs", "tok0"])
def _pool_select_kernel(scores_ptr, seq_lens_ptr, qsl_ptr, pools_ptr, out_ptr, num_seqs, tok0, stride_st, stride_pt,
                        stride_ot, K, KP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per row: its K best complete pools (pool ids into pools_ptr), then their tokens and its
    incomplete pool's into the output row."""
    row, tok, s_idx = _row_token(qsl_ptr, num_seqs, tok0)
    if s_idx >= num_seqs:
        return
    n = causal_len(qsl_ptr, seq_lens_ptr, s_idx, tok)
    m = n // KP
    pool_row = pools_ptr + row.to(tl.int64) * stride_pt
    _select_row(scores_ptr, scores_ptr, row.to(tl.int64) * stride_st, m, m, K, pool_row, False, BLOCK)
    tl.debug_barrier()  # the pool ids this program's threads wrote, read back by others
    out_row = out_ptr + tok.to(tl.int64) * stride_ot
    i = tl.arange(0, BLOCK_K)
    j = tl.arange(0, KP)
    p = tl.load(pool_row + i, mask=i < K, other=-1)
    tokens = tl.where(p[:, None] >= 0, p[:, None] * KP + j[None, :], -1)
    tl.store(out_row + i[:, None] * KP + j[None, :], tokens.to(tl.int32), mask=(i < K)[:, None])
    tail = n % KP
    tl.store(out_row + K * KP + j, tl.where(j < tail, n - tail + j, -1).to(tl.int32), mask=j < KP - 1)


def triton_dsa_pool_topk(q_THD: torch.Tensor, weights_TH: torch.Tensor, index_cache_BLX: torch.Tensor,
                         ape_PD: torch.Tensor, meta: AttentionMetadata, topk: int, scale: float,
                         max_len: int | None = None) -> torch.Tensor:
    """Same contract as `reference_dsa_pool_topk`: int32 [T, topk + KP - 1], the selected pools' tokens (pools in
    any order) then the incomplete pool's, -1 where none. No host sync."""
    common.check_dtype("q_THD", q_THD)
    T, H, D = q_THD.shape
    kp = ape_PD.shape[0]
    if kp & (kp - 1) or index_cache_BLX.shape[-1] != 2 * D or weights_TH.shape != (T, H) or ape_PD.shape != (kp, D):
        raise ValueError(f"triton_dsa_pool_topk: q {tuple(q_THD.shape)}, weights {tuple(weights_TH.shape)}, cache rows "
                         f"{index_cache_BLX.shape[-1]}, ape {tuple(ape_PD.shape)}: want [T, H, D], [T, H], 2 D, "
                         "[kpool, D] with kpool a power of two.")
    dev = q_THD.device
    K = topk // kp
    out = common.workspace((T, topk + kp - 1), torch.int32, dev)
    if T == 0:
        return out
    if meta.max_query_len == 1 and max_len is not None:
        W = max_len
    else:
        W = meta.max_seq_len if max_len is None else min(meta.max_seq_len, max_len)
    q_THD = q_THD if q_THD.stride(-1) == 1 else q_THD.contiguous()
    weights_TH, ape_PD = weights_TH.contiguous(), ape_PD.contiguous()
    interp = common.interpreting(q_THD)
    block_p, warps = (16, 4) if interp else _SCORE_CONFIG
    block_t, t_warps = (64, 4) if interp else _TOPK_CONFIG
    Pw = max(triton.cdiv(W // kp, block_p), 1) * block_p
    rows = max(1, min(T, _WORKSPACE_BYTES // (4 * Pw)))
    scores = common.workspace((rows, Pw), torch.float32, dev)
    pools = common.workspace((rows, max(K, 1)), torch.int32, dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
    for t0 in range(0, T, rows):
        r = min(rows, T - t0)
        G = min(Pw // block_p, triton.cdiv(4 * sms, r))
        _pool_scores_kernel[(r, G)](
            q_THD, weights_TH, index_cache_BLX, ape_PD, meta.block_tables_SM, meta.seq_lens_S,
            meta.query_start_loc_S1, scores, scale, meta.num_seqs, t0, G, q_THD.stride(0), q_THD.stride(1),
            weights_TH.stride(0), index_cache_BLX.stride(0), index_cache_BLX.stride(1), meta.block_tables_SM.stride(0),
            scores.stride(0), H, D, L=index_cache_BLX.shape[1], KP=kp, BLOCK_H=max(16, triton.next_power_of_2(H)),
            BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_P=block_p, INTERPRET=interp, num_warps=warps,
            num_stages=1)  # no software pipelining: its staged [BLOCK_P, D] tiles filled shared memory and spilled
        _pool_select_kernel[(r,)](
            scores, meta.seq_lens_S, meta.query_start_loc_S1, pools, out, meta.num_seqs, t0, scores.stride(0),
            pools.stride(0), out.stride(0), K, KP=kp, BLOCK=block_t, BLOCK_K=triton.next_power_of_2(max(K, 1)),
            num_warps=t_warps)
    return out


__all__ = ["triton_dsa_pool_topk"]
