"""DeepSeek Sparse Attention's selection in Triton: the lightning indexer's scores, then the top-k per query over its
causal range. Same contract as dsa.reference_dsa_topk (legend there: T, H, D, K, W, L).

Per slice of query rows, the scores, then the top-k (triton_dsa_select.py):
- scores (grid: rows x G): G programs per query token share its key tiles of BLOCK_N positions (G from the batch and
  the SM count only: about 4 programs per SM), each loading the token's [H, D] queries once and reading every key
  of its tiles through the block table once for all H heads: s = relu(scale * q [H, D] @ k^T [D, BLOCK_N]), then
  score = weights [H] . s, stored float32 into a [rows, W] workspace (-0.0 stored as 0.0); the loop ends at the
  token's causal length, so the work follows the device lengths while the grid follows the batch. fp8 keys (uint8
  rows with scales: kernels/dsa.py) widen exactly to the query's dtype, and each scale group's dot product is
  multiplied by the key's scale of that group (one group at DeepSeek-V3.2's D = 128: one dot, one multiply);
- top-k: one program per row, or for long rows and small batches P programs per row over spans of it and a merge
  (triton_dsa_select.split_programs picks P from the host bounds: the width and the batch). Output: K positions per
  row (any order), or n then -1.

No host length enters: W is the host bound for multi-token steps and `max_len` (max_model_len) for decode steps, whose
host lengths are placeholders inside a decode graph. Rows are sliced so that a workspace stays under
_WORKSPACE_BYTES (a prefill chunk of thousands of queries over a long context).

Cost, per query and layer: the scores read n keys (D values: 132 bytes per token fp8 with scales, 256 bf16, where
the dense MLA it replaces reads n latents of C + P: 576 values for DeepSeek-V3.2) and the selection 4 passes over n
float32 scores (from L2 for rows of up to a few MB), split over P programs for a long row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .attention import AttentionMetadata
from .dsa import SCALE_GROUP, check_index_inputs, fp8_index_views, fp8_key_groups, is_fp8_index_cache
from .triton_common import causal_len, dot
from .triton_dsa_select import _merge_topk_kernel, _partial_topk_kernel, _row_token, _topk_kernel, split_programs

_WORKSPACE_BYTES = 256 << 20
# (BLOCK_N, num_warps) of the scores kernel; the top-k kernel's tile and warps.
_SCORE_CONFIG = (64, 4)
_TOPK_CONFIG = (4096, 8)  # sm_90, Triton 3.6: 213 registers, no spills (1024 x 4 warps: 255; 1024 x 8: 128)
# The split path's partial and merge kernels (their select also moves the candidates' scores): 4096 x 8 warps spilled
# 8 B in the partial (255 registers) with Triton 3.6 on sm_90.
_SPLIT_TOPK_CONFIG = (2048, 8)


@triton.jit(do_not_specialize=["num_seqs", "tok0", "G"])
def _index_scores_kernel(q_ptr, w_ptr, cache_ptr, kscale_ptr, tables_ptr, seq_lens_ptr, qsl_ptr, scores_ptr, scale,
                         num_seqs, tok0, G, stride_qt, stride_qh, stride_wt, stride_cb, stride_cl, stride_sb, stride_sl,
                         stride_tb, stride_st, H, D, L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, GROUP: tl.constexpr, INTERPRET: tl.constexpr,
                         PREC: tl.constexpr):
    row, tok, s_idx = _row_token(qsl_ptr, num_seqs, tok0)
    if s_idx >= num_seqs:
        return
    n = causal_len(qsl_ptr, seq_lens_ptr, s_idx, tok)
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
        # An fp8 key widens exactly to the query's dtype.
        k = tl.load(cache_ptr + slot[:, None] + d[None, :], mask=ok[:, None] & (d[None, :] < D), other=0.0).to(q.dtype)
        if GROUPS == 0:  # float keys (or e4m3 ones stored at scale 1.0)
            s = dot(q, tl.trans(k), tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32), INTERPRET, PREC)
        else:  # fp8 keys: each group's dot product times the key's scale of that group (dsa.py's formula)
            srow = kscale_ptr + blk * stride_sb + (pos % L) * stride_sl
            s = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
            for g in tl.static_range(GROUPS):
                kg = k if GROUPS == 1 else tl.where((d // GROUP == g)[None, :], k, tl.zeros_like(k))
                sc = tl.load(srow + g, mask=ok, other=0.0)
                s += dot(q, tl.trans(kg), tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32), INTERPRET, PREC) * sc[None, :]
        s = tl.maximum(s * scale, 0.0)
        score = tl.sum(w[:, None] * s, axis=0)
        score = tl.where(score == 0.0, 0.0, score)  # -0.0 (negative weights times relu 0) counts as 0.0
        tl.store(out_ptr + pos, score, mask=ok)


def triton_dsa_topk(q_THD: torch.Tensor, weights_TH: torch.Tensor, index_cache_BLD: torch.Tensor,
                    meta: AttentionMetadata, topk: int, scale: float, max_len: int | None = None, *,
                    num_splits: int | None = None) -> torch.Tensor:
    """Same contract as `reference_dsa_topk`: int32 [T, topk] selected positions (any order), then -1. No host
    sync; decode steps score `max_len` positions wide (their host lengths may be a graph's placeholders).
    index_cache_BLD: float keys [B + 1, L, D] or fp8 keys with scales (uint8 rows: kernels/dsa.py). `num_splits`
    forces the top-k's programs per row (1: one program; tests), else triton_dsa_select.split_programs picks."""
    common.check_dtype("q_THD", q_THD)
    check_index_inputs(q_THD, weights_TH, index_cache_BLD)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits={num_splits} is invalid: must be >= 1 (or None to pick).")
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
    if is_fp8_index_cache(index_cache_BLD):
        keys, kscale = fp8_index_views(index_cache_BLD, D)
        groups = fp8_key_groups(D)
    else:
        keys, kscale, groups = index_cache_BLD, weights_TH, 0  # kscale: unread
    interp = common.interpreting(q_THD)
    block_n, warps = (16, 4) if interp else _SCORE_CONFIG
    block_t, t_warps = (64, 4) if interp else _TOPK_CONFIG
    block_s, s_warps = (64, 4) if interp else _SPLIT_TOPK_CONFIG
    Wp = triton.cdiv(W, block_n) * block_n
    rows = max(1, min(T, _WORKSPACE_BYTES // (4 * Wp)))
    scores = common.workspace((rows, Wp), torch.float32, dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
    for t0 in range(0, T, rows):
        r = min(rows, T - t0)
        G = min(Wp // block_n, triton.cdiv(4 * sms, r))  # about 4 programs per SM, from the batch only
        _index_scores_kernel[(r, G)](
            q_THD, weights_TH, keys, kscale, meta.block_tables_SM, meta.seq_lens_S, meta.query_start_loc_S1, scores,
            scale, meta.num_seqs, t0, G, q_THD.stride(0), q_THD.stride(1), weights_TH.stride(0), keys.stride(0),
            keys.stride(1), kscale.stride(0), kscale.stride(1) if kscale.dim() > 2 else 0,
            meta.block_tables_SM.stride(0), scores.stride(0), H, D, L=keys.shape[1],
            BLOCK_H=max(16, triton.next_power_of_2(H)), BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_N=block_n,
            GROUPS=groups, GROUP=SCALE_GROUP, INTERPRET=interp, PREC=common.dot_precision(q_THD.dtype),
            num_warps=warps)
        P = num_splits or split_programs(Wp, topk, r, sms)
        common_args = (meta.seq_lens_S, meta.query_start_loc_S1)
        if P == 1:
            _topk_kernel[(r,)](scores, *common_args, out, meta.num_seqs, t0, scores.stride(0), out.stride(0), topk,
                               BLOCK=block_t, num_warps=t_warps)
            continue
        cand_pos = common.workspace((r, P * topk), torch.int32, dev)
        cand_val = common.workspace((r, P * topk), torch.float32, dev)
        _partial_topk_kernel[(r, P)](scores, *common_args, cand_pos, cand_val, meta.num_seqs, t0, P, scores.stride(0),
                                     cand_pos.stride(0), topk, BLOCK=block_s, num_warps=s_warps)
        _merge_topk_kernel[(r,)](*common_args, cand_pos, cand_val, out, meta.num_seqs, t0, P, cand_pos.stride(0),
                                 out.stride(0), topk, BLOCK=block_s, num_warps=s_warps)
    return out


__all__ = ["triton_dsa_topk"]
