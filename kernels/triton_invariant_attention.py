"""Batch-invariant paged attention in Triton (issue 58 item 4): the GPU form of `invariant_paged_attention`.

Legend: T query tokens, S sequences, N query heads, K kv heads, G = N / K, H head dim, Hv value head dim, L block
size, Z key splits of the launch.

Why the normal kernels (kernels/triton_attention.py) are not invariant: the decode kernel splits a sequence's keys
among a number of programs planned from the batch (its sequence count and every sequence's tiles), and the prefill
kernel tiles BLOCK_Q tokens together and may split its keys by a count set by the step; a row's online softmax then
meets other key boundaries in another batch, and rounds otherwise.

Here nothing depends on the batch:
- each (token, kv head, split) computed by one program, alone: the token's G query heads (padded to BLOCK_G >= 16)
  as the tile's rows, the same code whether the token is a decode row or a row of a prefill chunk (a prefix-cache
  hit included); a launch holds P programs per (token, kv head), program p computing the row's splits p, p + P, ...
  in turn (P = min(Z, SPLIT_PROGRAMS / (tokens x kv heads)): a long row alone still spreads its splits over the
  SMs, and a grid sized for max_model_len in a graph does not launch a program per split a row may never reach);
- split z holds the keys at absolute positions [z * SPLIT_KEYS, (z + 1) * SPLIT_KEYS), walked in BLOCK_N tiles in
  position order: a row's splits and tiles follow from its own position only (never from a split count planned for
  the batch), and a split past the row's position does nothing;
- the merge reduces each row's splits 0, 1, ... in order, one at a time (never a tree over a width set by the
  batch): m = max of their log-sum-exps (exact in any order), then acc += e^(lse_z - m) o_z and l += e^(lse_z - m),
  the sink (if any) joining l once, out = acc * v_scale / l.
The partials hold Z = meta.max_seq_len / SPLIT_KEYS splits per row (a host int): an eager step's longest context,
and in a decode CUDA graph max_model_len (engine/rank/graph_policy.py `bound_host_lengths`: the graph is captured
with the host lengths at their bound, so a replay of any context lengths has its splits); the tokens go
TOKENS_PER_LAUNCH at a time, which bounds the partials' memory. None of Z, P or the token chunks changes what a row
computes. Same contract as `reference_paged_attention` (sinks, sliding window, fp8 cache scales).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .attention import FP8_CACHE_DTYPES, AttentionMetadata, _check_extras
from .triton_attention import _attend_tile, paged_shapes
from .triton_common import cast, seq_of_token

# Keys per split (GPU; the interpreter's tests pass a smaller one to cross split boundaries at small shapes):
# a decode step of a few long sequences still fills the SMs with ceil(context / 512) programs per (token, kv head).
SPLIT_KEYS = 512
BLOCK_N = 64  # keys per tile (bf16 / fp16); fp32 tiles are 32 keys on 8 warps (triton_attention._FP32_DECODE)
TOKENS_PER_LAUNCH = 512
# Split programs a launch aims for (P per (token, kv head), at least 1, at most the splits): a few per SM of an H100
# when the step's rows are many, and a row's own splits side by side when they are few.
SPLIT_PROGRAMS = 1024


@triton.jit
def _row_of(qsl_ptr, seq_lens_ptr, num_seqs, t):
    """(sequence, position, ok) of flat token t; ok is False past the batch's last token."""
    s_idx = seq_of_token(qsl_ptr, num_seqs, t)
    ok = s_idx < num_seqs
    s_safe = tl.where(ok, s_idx, 0)
    q_start = tl.load(qsl_ptr + s_safe)
    q_len = tl.load(qsl_ptr + s_safe + 1) - q_start
    pos = tl.load(seq_lens_ptr + s_safe) - q_len + (t - q_start)
    return s_safe, pos, ok


# Z and P unspecialised: one compiled kernel whatever the splits and programs per row.
@triton.jit(do_not_specialize=["Z", "P"])
def _bi_split_kernel(q_ptr, kc_ptr, vc_ptr, tables_ptr, seq_lens_ptr, qsl_ptr, part_o_ptr, part_lse_ptr, t0, scale,
                     window, num_seqs, stride_qt, stride_qn, stride_cb, stride_cl, stride_ck, stride_vb, stride_vl,
                     stride_vk, stride_tb, num_heads, head_dim, v_head_dim, Z, P, G: tl.constexpr, L: tl.constexpr,
                     BLOCK_G: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HV: tl.constexpr, BLOCK_N: tl.constexpr,
                     SPLIT_KEYS: tl.constexpr, WINDOW: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    t = t0 + tl.program_id(0)
    kv_head = tl.program_id(1)
    s_idx, pos, ok = _row_of(qsl_ptr, seq_lens_ptr, num_seqs, t)
    if not ok:
        return  # past the batch: the merge never reads it
    g = tl.arange(0, BLOCK_G)
    head = kv_head * G + g
    d = tl.arange(0, BLOCK_H)
    q = tl.load(q_ptr + t.to(tl.int64) * stride_qt + head[:, None] * stride_qn + d[None, :],
                mask=(g[:, None] < G) & (d[None, :] < head_dim), other=0.0)
    table_ptr = tables_ptr + s_idx.to(tl.int64) * stride_tb
    q_pos = g * 0 + pos
    dv = tl.arange(0, BLOCK_HV)
    # This program's splits of the row: z = its index, + P, + 2P, ... below the row's own count (splits past its
    # position are never run: the merge never reads them). Which program computes a split changes nothing in it.
    for z in range(tl.program_id(2), pos // SPLIT_KEYS + 1, P):
        lo = z * SPLIT_KEYS
        hi = tl.minimum(lo + SPLIT_KEYS, pos + 1)
        start = lo
        if WINDOW:
            first = tl.maximum(pos - window + 1, 0)
            start = tl.where(first > lo, lo + ((first - lo) // BLOCK_N) * BLOCK_N, lo)
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_HV], dtype=tl.float32)
        for k0 in range(start, hi, BLOCK_N):
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, kc_ptr, vc_ptr, table_ptr, kv_head, k0, hi, q_pos, scale,
                                         window, stride_cb, stride_cl, stride_ck, stride_vb, stride_vl, stride_vk,
                                         head_dim, v_head_dim, BLOCK_G, L, BLOCK_N, BLOCK_H, BLOCK_HV, True, WINDOW,
                                         INTERPRET, PREC)
        has = l_i > 0  # a split wholly before a window sees no key: lse -inf, o 0 (the merge adds exactly 0 for it)
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        row = ((t - t0).to(tl.int64) * num_heads + head) * Z + z
        tl.store(part_o_ptr + row[:, None] * BLOCK_HV + dv[None, :], o, mask=g[:, None] < G)
        tl.store(part_lse_ptr + row, tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf")),
                 mask=g < G)


@triton.jit
def _bi_merge_kernel(part_o_ptr, part_lse_ptr, qsl_ptr, seq_lens_ptr, out_ptr, sinks_ptr, t0, v_scale, num_seqs,
                     stride_ot, stride_on, num_heads, v_head_dim, Z, SPLIT_KEYS: tl.constexpr,
                     BLOCK_HV: tl.constexpr, SINKS: tl.constexpr, INTERPRET: tl.constexpr):
    t = t0 + tl.program_id(0)
    head = tl.program_id(1)
    _, pos, ok = _row_of(qsl_ptr, seq_lens_ptr, num_seqs, t)
    n = tl.where(ok, pos // SPLIT_KEYS + 1, 0)  # the row's own splits
    base = ((t - t0).to(tl.int64) * num_heads + head) * Z
    m = tl.full([1], float("-inf"), dtype=tl.float32)
    for z in range(0, n):  # a max is exact in any order; one split at a time all the same
        m = tl.maximum(m, tl.load(part_lse_ptr + base + z + tl.zeros([1], dtype=tl.int32)))
    m = tl.where(m == float("-inf"), 0.0, m)
    dv = tl.arange(0, BLOCK_HV)
    acc = tl.zeros([BLOCK_HV], dtype=tl.float32)
    l_i = tl.zeros([1], dtype=tl.float32)
    for z in range(0, n):  # in split order, one at a time: the row's sum never depends on the grid
        w = tl.exp(tl.load(part_lse_ptr + base + z + tl.zeros([1], dtype=tl.int32)) - m)
        acc += w * tl.load(part_o_ptr + (base + z) * BLOCK_HV + dv)
        l_i += w
    if SINKS:
        sink = tl.load(sinks_ptr + head + tl.zeros([1], dtype=tl.int32)).to(tl.float32)
        m2 = tl.maximum(m, sink)
        f = tl.exp(m - m2)
        l_i = l_i * f + tl.exp(sink - m2)
        acc = acc * f
    o = acc * v_scale / tl.where(l_i > 0, l_i, 1.0)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + head * stride_on + dv, cast(o, out_ptr.dtype.element_ty, INTERPRET),
             mask=dv < v_head_dim)


def triton_invariant_paged_attention(
    q_TNH: torch.Tensor, k_cache_BLKH: torch.Tensor, v_cache_BLKH: torch.Tensor, meta: AttentionMetadata,
    scale: float, *, sinks_N: torch.Tensor | None = None, sliding_window: int | None = None,
    k_scale: float = 1.0, v_scale: float = 1.0, out: torch.Tensor | None = None, split_keys: int | None = None,
    programs: int | None = None,
) -> torch.Tensor:
    """`reference_paged_attention`'s contract, each row computed alone (module docstring): [T, N, Hv] in q's dtype.
    `split_keys` (a multiple of the key tile; tests) replaces SPLIT_KEYS; `programs` (tests) replaces P, the split
    programs per (token, kv head). No device->host sync."""
    T, N, H, L, K, Hv = paged_shapes(q_TNH, k_cache_BLKH, v_cache_BLKH)
    if k_cache_BLKH.dtype != q_TNH.dtype and (k_cache_BLKH.dtype not in FP8_CACHE_DTYPES
                                              or v_cache_BLKH.dtype != k_cache_BLKH.dtype):
        raise ValueError(f"cache dtypes {k_cache_BLKH.dtype} / {v_cache_BLKH.dtype} are invalid for q_TNH "
                         f"{q_TNH.dtype}: the cache holds the query's dtype, or float8_e4m3fn for both K and V.")
    _check_extras(q_TNH, sinks_N, sliding_window)
    out = common.out_buffer(out, "out", (T, N, Hv), q_TNH.dtype, q_TNH.device)
    if T == 0:
        return out
    interp = common.interpreting(q_TNH)
    fp32 = q_TNH.dtype == torch.float32
    block_n = 16 if interp else (32 if fp32 else BLOCK_N)
    keys = split_keys or SPLIT_KEYS
    if keys < block_n or keys % block_n:
        raise ValueError(f"split_keys={keys} is invalid: must be a positive multiple of the key tile ({block_n}).")
    if programs is not None and programs < 1:
        raise ValueError(f"programs={programs} is invalid: must be at least 1 split program per (token, kv head).")
    q_TNH = q_TNH if q_TNH.stride(-1) == 1 else q_TNH.contiguous()
    G = N // K
    BLOCK_G = max(16, triton.next_power_of_2(G))
    BLOCK_H, BLOCK_HV = max(16, triton.next_power_of_2(H)), max(16, triton.next_power_of_2(Hv))
    Z = triton.cdiv(max(meta.max_seq_len, 1), keys)
    chunk = min(T, TOKENS_PER_LAUNCH)
    part_o = common.workspace((chunk, N, Z, BLOCK_HV), torch.float32, q_TNH.device)
    part_lse = common.workspace((chunk, N, Z), torch.float32, q_TNH.device)
    tables = meta.block_tables_SM
    flags = dict(INTERPRET=interp, PREC=common.dot_precision(q_TNH.dtype))
    window = sliding_window or 0
    sinks = sinks_N if sinks_N is not None else out  # a placeholder pointer when there are none (never read)
    warps = 8 if fp32 or max(BLOCK_H, BLOCK_HV) >= 256 else 4
    for t0 in range(0, T, chunk):
        n_tok = min(chunk, T - t0)
        P = min(Z, programs or max(1, triton.cdiv(SPLIT_PROGRAMS, n_tok * K)))
        _bi_split_kernel[(n_tok, K, P)](
            q_TNH, k_cache_BLKH, v_cache_BLKH, tables, meta.seq_lens_S, meta.query_start_loc_S1, part_o, part_lse,
            t0, float(scale) * float(k_scale), window, meta.num_seqs, q_TNH.stride(0), q_TNH.stride(1),
            k_cache_BLKH.stride(0), k_cache_BLKH.stride(1), k_cache_BLKH.stride(2), v_cache_BLKH.stride(0),
            v_cache_BLKH.stride(1), v_cache_BLKH.stride(2), tables.stride(0), N, H, Hv, Z, P, G=G, L=L,
            BLOCK_G=BLOCK_G, BLOCK_H=BLOCK_H, BLOCK_HV=BLOCK_HV, BLOCK_N=block_n, SPLIT_KEYS=keys,
            WINDOW=sliding_window is not None, num_warps=warps, **flags)
        _bi_merge_kernel[(n_tok, N)](
            part_o, part_lse, meta.query_start_loc_S1, meta.seq_lens_S, out, sinks, t0, float(v_scale),
            meta.num_seqs, out.stride(0), out.stride(1), N, Hv, Z, SPLIT_KEYS=keys, BLOCK_HV=BLOCK_HV,
            SINKS=sinks_N is not None, INTERPRET=interp, num_warps=4)
    return out


__all__ = ["SPLIT_KEYS", "SPLIT_PROGRAMS", "TOKENS_PER_LAUNCH", "triton_invariant_paged_attention"]
