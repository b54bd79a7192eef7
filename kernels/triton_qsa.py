"""QSA's attention in Triton: gated GQA's heads over the positions the indexer selected (qsa.py's contract,
reference_sparse_gqa_attention; legend there).

Grid (T, K): a program takes the N / K query heads of one token that share kv head k, and walks the token's X
position slots in BLOCK_N tiles: the positions (-1 anywhere is padding), their blocks from the sequence's table, one
[BLOCK_N, H] key tile and one [BLOCK_N, Hv] value tile, online softmax in exp2 over the valid ones. Bytes read per
token and layer: X rows of K and V per kv head, whatever the context (QSA's budget + c - 1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import AttentionMetadata
from .triton_common import check_dtype, dot, dot_precision, interpreting, seq_of_token, workspace

_LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["num_seqs"])
def _sparse_gqa_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, qsl_ptr, pos_ptr, out_ptr, scale_log2, num_seqs, X, G, H, Hv,
                       stride_qt, stride_qn, stride_ks, stride_kk, stride_vs, stride_vk, stride_tb, stride_pt,
                       stride_ot, stride_on, L: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    tok = tl.program_id(0)
    kvh = tl.program_id(1)
    s_idx = seq_of_token(qsl_ptr, num_seqs, tok)
    if s_idx >= num_seqs:
        return
    tok64 = tok.to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_H)
    dv = tl.arange(0, BLOCK_V)
    g_ok, d_ok, dv_ok = g < G, d < H, dv < Hv
    heads = kvh * G + g
    q = tl.load(q_ptr + tok64 * stride_qt + heads[:, None] * stride_qn + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_V], tl.float32)
    for x0 in range(0, X, BLOCK_N):
        x = x0 + tl.arange(0, BLOCK_N)
        pos = tl.load(pos_ptr + tok64 * stride_pt + x, mask=x < X, other=-1).to(tl.int64)
        valid = pos >= 0
        p0 = tl.where(valid, pos, 0)
        block = tl.load(tables_ptr + s_idx.to(tl.int64) * stride_tb + p0 // L, mask=valid, other=0).to(tl.int64)
        slot = block * L + p0 % L
        k = tl.load(k_ptr + slot[:, None] * stride_ks + kvh * stride_kk + d[None, :],
                    mask=valid[:, None] & d_ok[None, :], other=0.0)
        s = dot(q, tl.trans(k), tl.zeros([BLOCK_G, BLOCK_N], tl.float32), INTERPRET, PREC) * scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + slot[:, None] * stride_vs + kvh * stride_vk + dv[None, :],
                    mask=valid[:, None] & dv_ok[None, :], other=0.0)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], INTERPRET, PREC)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + tok64 * stride_ot + heads[:, None] * stride_on + dv[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & dv_ok[None, :])


def triton_sparse_gqa_attention(q_TNH: torch.Tensor, k_cache_BLKH: torch.Tensor, v_cache_BLKH: torch.Tensor,
                                meta: AttentionMetadata, pos_TX: torch.Tensor, scale: float) -> torch.Tensor:
    """Same contract as `reference_sparse_gqa_attention`: [T, N, Hv] in q's dtype. No host sync."""
    check_dtype("q_TNH", q_TNH)
    T, N, H = q_TNH.shape
    L, K, Hv = k_cache_BLKH.shape[1], k_cache_BLKH.shape[2], v_cache_BLKH.shape[3]
    if N % K or k_cache_BLKH.shape[3] != H or pos_TX.shape[0] != T:
        raise ValueError(f"q_TNH {tuple(q_TNH.shape)}, k_cache {tuple(k_cache_BLKH.shape)}, pos_TX "
                         f"{tuple(pos_TX.shape)} are invalid: N a multiple of the kv heads, one head dim, a row per token.")
    q = q_TNH.contiguous()
    pos = pos_TX.contiguous()
    k = k_cache_BLKH.reshape(-1, K, H)
    v = v_cache_BLKH.reshape(-1, K, Hv)
    out = workspace((T, N, Hv), q.dtype, q.device)
    if T == 0:
        return out
    G, X = N // K, pos.shape[1]
    interp = interpreting(q)
    _sparse_gqa_kernel[(T, K)](
        q, k, v, meta.block_tables_SM, meta.query_start_loc_S1, pos, out, scale * _LOG2E, meta.num_seqs, X, G, H, Hv,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), meta.block_tables_SM.stride(0),
        pos.stride(0), out.stride(0), out.stride(1), L=L, BLOCK_G=max(16, triton.next_power_of_2(G)),
        BLOCK_H=max(16, triton.next_power_of_2(H)), BLOCK_V=max(16, triton.next_power_of_2(Hv)), BLOCK_N=32,
        INTERPRET=interp, PREC=dot_precision(q.dtype))
    return out


__all__ = ["triton_sparse_gqa_attention"]
