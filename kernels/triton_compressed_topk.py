"""DeepSeek-V4's lightning indexer in Triton: scores of every compressed entry a query may see, then its top-k. Same
contract as compressed_attention.reference_indexer_topk (legend there), except that the K picks come in any order (the
attention only marks them; the tests compare them sorted).

- scores (grid: queries x G, G programs per query sharing its entry tiles, about 4 programs per SM as DSA's): a
  query's [n_I, I] index queries loaded once, each tile of BLOCK_E keys read once for all heads,
  score = sum_h w[h] n_I^-0.5 relu(q[h] . k I^-0.5) in float32, stored into a [T, E] workspace up to the query's
  visible count (-0.0 stored as 0.0, as the reference's float ordering sees it);
- top-k: DeepSeek Sparse Attention's selection kernels (triton_dsa_select.py: a radix select per row, or for long
  rows P programs per row and a merge), each query a "sequence" of one token whose causal length is its visible
  count (seq_lens = visible_T, query starts 0..T): the same exact order, ties to the lowest entries (`select_topk`;
  the indexer over paged keys, triton_compressed_attention_paged.py, shares it, `load_index_query`, `score_tile`
  and `score_buffers`).

No host sync: the work follows visible_T on the device; E (the keys given) sizes the workspace and the split.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .triton_common import dot
from .triton_dsa_select import _merge_topk_kernel, _partial_topk_kernel, _topk_kernel, split_programs

_SCORE_CONFIG = (64, 4)  # BLOCK_E, num_warps
_TOPK_CONFIG = (4096, 8)  # as triton_dsa_topk's: one program per row
_SPLIT_TOPK_CONFIG = (2048, 8)


@triton.jit
def load_index_query(q_ptr, w_ptr, t, stride_qt, stride_qh, stride_wt, nI, I, w_scale, BLOCK_NI: tl.constexpr,
                     BLOCK_I: tl.constexpr):
    """Query t's index queries [BLOCK_NI, BLOCK_I] (zeros past nI / I) and its head weights times w_scale (float32
    [BLOCK_NI]): what a score program holds while it walks the keys."""
    h = tl.arange(0, BLOCK_NI)
    d = tl.arange(0, BLOCK_I)
    q = tl.load(q_ptr + t * stride_qt + h[:, None] * stride_qh + d[None, :], mask=(h[:, None] < nI) & (d[None, :] < I),
                other=0.0)
    return q, tl.load(w_ptr + t * stride_wt + h, mask=h < nI, other=0.0).to(tl.float32) * w_scale


@triton.jit
def score_tile(q, k, w, q_scale, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    """[BLOCK_E] float32 scores of a key tile k [BLOCK_E, BLOCK_I] for the index queries q [BLOCK_NI, BLOCK_I] with
    head weights w [BLOCK_NI] (already times n_I^-0.5); -0.0 comes out as 0.0 (the reference's float ordering)."""
    # bf16 products are exact in fp32, the MMA accumulates in fp32: the reference's float32 scores on tensor cores
    s = dot(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], tl.float32), INTERPRET, PREC)
    s = tl.maximum(s, 0.0) * q_scale
    score = tl.sum(w[:, None] * s, axis=0)
    return tl.where(score == 0.0, 0.0, score)


@triton.jit(do_not_specialize=["E", "G"])
def _compressed_index_scores_kernel(q_ptr, w_ptr, keys_ptr, visible_ptr, scores_ptr, E, G, nI, I, q_scale, w_scale,
                                    stride_qt, stride_qh, stride_wt, stride_kt, stride_ke, stride_st,
                                    BLOCK_NI: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_E: tl.constexpr,
                                    INTERPRET: tl.constexpr, PREC: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    n = tl.minimum(tl.load(visible_ptr + t).to(tl.int32), E)
    q, w = load_index_query(q_ptr, w_ptr, t, stride_qt, stride_qh, stride_wt, nI, I, w_scale, BLOCK_NI, BLOCK_I)
    d = tl.arange(0, BLOCK_I)
    for tile in range(tl.program_id(1), tl.cdiv(n, BLOCK_E), G):
        e = tile * BLOCK_E + tl.arange(0, BLOCK_E)
        ok = e < n
        k = tl.load(keys_ptr + t * stride_kt + e[:, None].to(tl.int64) * stride_ke + d[None, :], mask=ok[:,
        None] & (d[None, :] < I),
                    other=0.0).to(q.dtype)
        score = score_tile(q, k, w, q_scale, INTERPRET, PREC)
        tl.store(scores_ptr + t * stride_st + e, score, mask=ok)


def triton_compressed_indexer_topk(q_TnI: torch.Tensor, w_Tn: torch.Tensor, keys_EI: torch.Tensor,
                                   visible_T: torch.Tensor, top_k: int, *,
                                   num_splits: int | None = None) -> torch.Tensor:
    """int32 [T, top_k]: each query's top_k entries among its first visible_T[t] (all of them, then -1, when fewer);
    any order. keys_EI [E, I] shared, or [T, E, I] per query (a batched decode step). `num_splits` forces the
    top-k's programs per row (1: one program; tests), else split_programs picks
    from E and the batch (host sizes only)."""
    common.check_dtype("q_TnI", q_TnI)
    T, nI, I = q_TnI.shape
    E = keys_EI.shape[-2]
    if w_Tn.shape != (T, nI) or keys_EI.shape not in ((E, I), (T, E, I)) or visible_T.shape != (T,):
        raise ValueError(f"w_Tn {tuple(w_Tn.shape)}, keys_EI {tuple(keys_EI.shape)} and visible_T "
                         f"{tuple(visible_T.shape)} are invalid: must be [{T}, {nI}], [E, {I}] or [{T}, E, {I}], "
                         f"and [{T}].")
    out, scores, lens_T, block_e, warps = score_buffers(q_TnI, visible_T, E, top_k, num_splits)
    if T == 0:
        return out
    dev, interp, Ep = q_TnI.device, common.interpreting(q_TnI), scores.shape[1]
    q = q_TnI if q_TnI.stride(-1) == 1 else q_TnI.contiguous()
    w, keys = w_Tn.contiguous(), keys_EI.to(q.dtype).contiguous()
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
    G = max(1, min(Ep // block_e, triton.cdiv(4 * sms, T)))
    _compressed_index_scores_kernel[(T, G)](
        q, w, keys, lens_T, scores, E, G, nI, I, I**-0.5, nI**-0.5, q.stride(0), q.stride(1), w.stride(0),
        keys.stride(0) if keys.dim() == 3 else 0, keys.stride(-2), scores.stride(0), BLOCK_NI=max(16,
        triton.next_power_of_2(nI)),
        BLOCK_I=max(16, triton.next_power_of_2(I)), BLOCK_E=block_e, INTERPRET=interp,
        PREC=common.dot_precision(q.dtype), num_warps=warps)
    select_topk(scores, lens_T, top_k, out, sms, num_splits=num_splits)
    return out


def score_buffers(q_TnI: torch.Tensor, visible_T: torch.Tensor, E: int, top_k: int, num_splits: int | None):
    """What an indexer wrapper allocates before scoring E entries (this one's and
    triton_compressed_attention_paged.py's): (out int32 [T, top_k], scores float32 [T, E'] with E' = E rounded up to the
    score tile, lens_T int32 = visible_T clamped to E, BLOCK_E, num_warps). Refuses a top_k or num_splits below 1."""
    if top_k < 1 or (num_splits is not None and num_splits < 1):
        raise ValueError(f"top_k={top_k} / num_splits={num_splits} are invalid: must be >= 1.")
    T, dev = q_TnI.shape[0], q_TnI.device
    block_e, warps = (16, 4) if common.interpreting(q_TnI) else _SCORE_CONFIG
    Ep = max(1, triton.cdiv(E, block_e)) * block_e
    # Each query is a one-token "sequence" of the DSA selection kernels: causal length = its visible count.
    lens_T = torch.clamp(visible_T, max=E).to(torch.int32)
    return (common.workspace((T, top_k), torch.int32, dev), common.workspace((T, Ep), torch.float32, dev), lens_T,
            block_e, warps)


def select_topk(scores_TE: torch.Tensor, lens_T: torch.Tensor, top_k: int, out_TK: torch.Tensor, sms: int, *,
                num_splits: int | None = None) -> None:
    """out_TK (int32 [T, top_k]) = each row's top_k entries of scores_TE (float32 [T, E']) among its first
    lens_T[t] (int32), then -1: DSA's selection kernels with each row a one-token
    "sequence" whose causal length is lens_T[t]. Shared by the indexer over given keys (above) and over paged keys
    (triton_compressed_attention_paged.py)."""
    T, Ep = scores_TE.shape
    dev = scores_TE.device
    interp = common.interpreting(scores_TE)
    block_t, t_warps = (64, 4) if interp else _TOPK_CONFIG
    block_s, s_warps = (64, 4) if interp else _SPLIT_TOPK_CONFIG
    qsl_T1 = torch.arange(T + 1, dtype=torch.int32, device=dev)
    P = num_splits or split_programs(Ep, top_k, T, sms)
    if P == 1:
        _topk_kernel[(T,)](scores_TE, lens_T, qsl_T1, out_TK, T, 0, scores_TE.stride(0), out_TK.stride(0), top_k,
                           BLOCK=block_t, num_warps=t_warps)
        return
    cand_pos = common.workspace((T, P * top_k), torch.int32, dev)
    cand_val = common.workspace((T, P * top_k), torch.float32, dev)
    _partial_topk_kernel[(T, P)](scores_TE, lens_T, qsl_T1, cand_pos, cand_val, T, 0, P, scores_TE.stride(0),
                                 cand_pos.stride(0), top_k, BLOCK=block_s, num_warps=s_warps)
    _merge_topk_kernel[(T,)](lens_T, qsl_T1, cand_pos, cand_val, out_TK, T, 0, P, cand_pos.stride(0),
                             out_TK.stride(0), top_k, BLOCK=block_s, num_warps=s_warps)


__all__ = ["load_index_query", "score_buffers", "score_tile", "select_topk", "triton_compressed_indexer_topk"]
