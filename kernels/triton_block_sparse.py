"""Block-sparse attention in Triton (MiniMax-M3's sparse layers): the indexer's block scores, and GQA where each query
head reads only the key blocks its index head kept. Same contracts as block_sparse.reference_block_sparse_select and
reference_block_sparse_attention (legend there: T, N, K, H, Hv, I, L, S).

Selection: grid (T, H), a program scores its (token, index head)'s visible blocks one BLOCK_N tile each (the max of
q . k over the block's visible positions, float32) into a [T, H, blocks of max_len] workspace filled with -inf, then
+inf on its local blocks; the top-k runs on the device as torch.topk, its shape fixed by T and max_len (decode graphs).

Attention: grid (T, N / U), a program takes a run of U query heads of one token that share their selection and
their kv head (U = the caller's `group`, MiniMax-M3's 16 query heads per index head and kv head; 1 in general) and
walks their S selection slots; a slot holding block b (>= 0) reads that block's positions b * block_size ...
(block_size of them, in one BLOCK_N tile; masked past the query's own position, the causal edge), their cache rows
through the sequence's block table (the paged cache's blocks of L positions, unrelated to the selection's), the kv
head's [BLOCK_N, H] keys and [BLOCK_N, Hv] values once for the run's U heads (two tensor-core dots), and folds them
into an online softmax in exp2 (float32). A -1 slot is a tile with every position masked: it changes nothing. Every
query keeps one block at least (its own when local_blocks > 0; else any visible one), so the sum is never empty. An
fp8 cache is widened in registers, its scales folded into the softmax scale and the output.

Bytes read per token and run of heads: S * block_size key and value rows, whatever the context (16 x 128 positions
for MiniMax-M3), where dense attention reads the whole context. Not tuned yet (one launch config, no split of the
slots for small decode batches).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .attention import AttentionMetadata
from .triton_common import causal_len, dot, seq_of_token

_LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["num_seqs"])
def _block_sparse_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, seq_lens_ptr, qsl_ptr, blocks_ptr, out_ptr, scale_log2,
                         v_scale, num_seqs, stride_qt, stride_qn, stride_kb, stride_kl, stride_kk, stride_vb, stride_vl,
                         stride_vk, stride_tb, stride_bt, stride_bn, stride_ot, stride_on, heads_per_kv, U, H, HV, S,
                         L: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_HV: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    tok = tl.program_id(0)
    n0 = tl.program_id(1) * U  # a run of U query heads: one selection, one kv head
    s_idx = seq_of_token(qsl_ptr, num_seqs, tok)
    if s_idx >= num_seqs:
        return
    vis = causal_len(qsl_ptr, seq_lens_ptr, s_idx, tok)  # positions < vis are visible
    kvh = n0 // heads_per_kv
    tok64 = tok.to(tl.int64)
    u = tl.arange(0, BLOCK_U)
    u_ok = u < U
    d = tl.arange(0, BLOCK_H)
    d_ok = d < H
    e = tl.arange(0, BLOCK_HV)
    e_ok = e < HV
    q = tl.load(q_ptr + tok64 * stride_qt + (n0 + u)[:, None] * stride_qn + d[None, :],
                mask=u_ok[:, None] & d_ok[None, :], other=0.0)
    j = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_U], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_U], tl.float32)
    acc = tl.zeros([BLOCK_U, BLOCK_HV], tl.float32)
    for i in range(0, S):
        b = tl.load(blocks_ptr + tok64 * stride_bt + n0 * stride_bn + i)
        pos = b * BS + j
        ok = (j < BS) & (pos < vis) & (pos >= 0)  # a -1 slot: every position negative
        pos = tl.where(ok, pos, 0)
        page = tl.load(tables_ptr + s_idx * stride_tb + pos // L, mask=ok, other=0).to(tl.int64)
        k_off = page * stride_kb + (pos % L) * stride_kl + kvh * stride_kk
        k = tl.load(k_ptr + k_off[:, None] + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0).to(q.dtype)
        s = dot(q, tl.trans(k), tl.zeros([BLOCK_U, BLOCK_N], tl.float32), INTERPRET, PREC) * scale_log2
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: keep the sums at zero
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        v_off = page * stride_vb + (pos % L) * stride_vl + kvh * stride_vk
        v = tl.load(v_ptr + v_off[:, None] + e[None, :], mask=ok[:, None] & e_ok[None, :], other=0.0).to(q.dtype)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = dot(p.to(q.dtype), v, acc * alpha[:, None], INTERPRET, PREC)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None] * v_scale
    tl.store(out_ptr + tok64 * stride_ot + (n0 + u)[:, None] * stride_on + e[None, :],
             out.to(out_ptr.dtype.element_ty), mask=u_ok[:, None] & e_ok[None, :])


@triton.jit(do_not_specialize=["num_seqs"])
def _block_scores_kernel(q_ptr, cache_ptr, tables_ptr, seq_lens_ptr, qsl_ptr, scores_ptr, num_seqs, stride_qt,
                         stride_qh, stride_cb, stride_cl, stride_tb, stride_st, stride_sh, I,
                         L: tl.constexpr, BS: tl.constexpr, LOCAL: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_I: tl.constexpr):
    tok = tl.program_id(0)
    h = tl.program_id(1)
    s_idx = seq_of_token(qsl_ptr, num_seqs, tok)
    if s_idx >= num_seqs:
        return
    vis = causal_len(qsl_ptr, seq_lens_ptr, s_idx, tok)
    tok64 = tok.to(tl.int64)
    d = tl.arange(0, BLOCK_I)
    d_ok = d < I
    q = tl.load(q_ptr + tok64 * stride_qt + h * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32)
    j = tl.arange(0, BLOCK_N)
    for b in range(0, tl.cdiv(vis, BS)):  # the blocks it sees; the rest stay -inf (the caller's fill)
        pos = b * BS + j
        ok = (j < BS) & (pos < vis)
        pos = tl.where(ok, pos, 0)
        page = tl.load(tables_ptr + s_idx * stride_tb + pos // L, mask=ok, other=0).to(tl.int64)
        off = page * stride_cb + (pos % L) * stride_cl
        k = tl.load(cache_ptr + off[:, None] + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        s = tl.where(ok, tl.sum(k * q[None, :], axis=1), float("-inf"))
        tl.store(scores_ptr + tok64 * stride_st + h * stride_sh + b, tl.max(s, 0))
    own = (vis - 1) // BS
    for back in range(0, LOCAL):  # forced in, as transformers does: +inf (after the scores: a local block's own)
        tl.store(scores_ptr + tok64 * stride_st + h * stride_sh + tl.maximum(own - back, 0), float("inf"))


def triton_block_sparse_select(q_THI: torch.Tensor, index_cache_BLI: torch.Tensor, meta: AttentionMetadata,
                               block_size: int, topk_blocks: int, local_blocks: int,
                               max_len: int | None = None) -> torch.Tensor:
    """Same contract as `reference_block_sparse_select`: int32 [T, H, topk_blocks], -1 padded. One launch scores
    every visible block of every (token, index head), and the local ones +inf, into a float32 [T, H, ceil(W /
    block_size)] workspace, then torch.topk on the device. W: for a decode step `max_len`, a bound of every
    sequence's length the caller guarantees (max_model_len), so a decode graph replays with any lengths; for a
    multi-token step the host max_seq_len (within max_len). No host sync."""
    T, H, I = q_THI.shape
    # Decode steps: max_len wide (their host lengths may be a graph's placeholders); multi-token steps (never
    # captured) the host bound, so a long prefill's workspace is as wide as its context, not max_model_len.
    if meta.max_query_len == 1 and max_len is not None:
        W = max_len
    else:
        W = meta.max_seq_len if max_len is None else min(meta.max_seq_len, max_len)
    nb = max(1, -(-W // block_size))
    scores = torch.full((T, H, nb), float("-inf"), dtype=torch.float32, device=q_THI.device)
    out = torch.full((T, H, topk_blocks), -1, dtype=torch.int32, device=q_THI.device)
    if T == 0:
        return out
    q_THI = q_THI if q_THI.stride(-1) == 1 else q_THI.contiguous()
    _block_scores_kernel[(T, H)](
        q_THI, index_cache_BLI, meta.block_tables_SM, meta.seq_lens_S, meta.query_start_loc_S1, scores, meta.num_seqs,
        q_THI.stride(0), q_THI.stride(1), index_cache_BLI.stride(0), index_cache_BLI.stride(1),
        meta.block_tables_SM.stride(0), scores.stride(0), scores.stride(1), I, L=index_cache_BLI.shape[1],
        BS=block_size, LOCAL=local_blocks, BLOCK_N=max(16, triton.next_power_of_2(block_size)),
        BLOCK_I=max(16, triton.next_power_of_2(I)), num_warps=4)
    k = min(topk_blocks, nb)
    vals, ids = scores.topk(k, dim=-1)
    out[..., :k] = ids.masked_fill(vals == float("-inf"), -1).to(torch.int32)
    return out


def triton_block_sparse_attention(q_TNH: torch.Tensor, k_cache_BLKH: torch.Tensor, v_cache_BLKH: torch.Tensor,
                                  meta: AttentionMetadata, blocks_TNS: torch.Tensor, block_size: int, scale: float,
                                  k_scale: float = 1.0, v_scale: float = 1.0, group: int = 1) -> torch.Tensor:
    """Same contract as `reference_block_sparse_attention`: [T, N, Hv] in q's dtype. No host sync. `group`: runs of
    that many consecutive query heads share their selection (blocks_TNS of the run's first head is read) and, within
    the kv heads' runs, their kv head: a program takes one run, each key and value tile read once for it."""
    common.check_dtype("q_TNH", q_TNH)
    T, N, H = q_TNH.shape
    _, L, K, Hv = v_cache_BLKH.shape
    if blocks_TNS.dim() != 3 or tuple(blocks_TNS.shape[:2]) != (T, N):
        raise ValueError(f"blocks_TNS {tuple(blocks_TNS.shape)} is invalid: must be [{T}, {N}, topk_blocks].")
    if N % K:
        raise ValueError(f"q_TNH has {N} heads, not a multiple of the cache's {K} kv heads.")
    U = math.gcd(group, N // K)  # a run never straddles two kv heads
    out = common.workspace((T, N, Hv), q_TNH.dtype, q_TNH.device)
    if T == 0:
        return out
    q_TNH = q_TNH if q_TNH.stride(-1) == 1 else q_TNH.contiguous()
    blocks_TNS = blocks_TNS.to(torch.int32).contiguous()
    S = blocks_TNS.shape[2]
    _block_sparse_kernel[(T, N // U)](
        q_TNH, k_cache_BLKH, v_cache_BLKH, meta.block_tables_SM, meta.seq_lens_S, meta.query_start_loc_S1, blocks_TNS,
        out, scale * k_scale * _LOG2E, v_scale, meta.num_seqs, q_TNH.stride(0), q_TNH.stride(1),
        k_cache_BLKH.stride(0), k_cache_BLKH.stride(1), k_cache_BLKH.stride(2), v_cache_BLKH.stride(0),
        v_cache_BLKH.stride(1), v_cache_BLKH.stride(2), meta.block_tables_SM.stride(0), blocks_TNS.stride(0),
        blocks_TNS.stride(1), out.stride(0), out.stride(1), N // K, U, H, Hv, S, L=L, BS=block_size,
        BLOCK_N=max(16, triton.next_power_of_2(block_size)), BLOCK_U=max(16, triton.next_power_of_2(U)),
        BLOCK_H=max(16, triton.next_power_of_2(H)), BLOCK_HV=max(16, triton.next_power_of_2(Hv)),
        INTERPRET=common.interpreting(q_TNH), PREC=common.dot_precision(q_TNH.dtype), num_warps=4)
    return out


__all__ = ["triton_block_sparse_attention", "triton_block_sparse_select"]
