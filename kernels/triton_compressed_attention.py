"""DeepSeek-V4's attention ops in Triton (issue 45): the compressor's pooling, the attention over the window and the
compressed entries with the per-head sink, and the grouped low-rank output projection. Same contracts as the
references in kernels/compressed_attention.py (legend there); the indexer's top-k is triton_compressed_topk.py.

- `triton_compress_kv`: grid (windows, H tiles). A window's 2m (CSA: the previous window's Ca half, then this
  window's Cb half) or m (HCA) gate rows are softmaxed over the rows per channel in float32 (a -inf gate, CSA's
  window 0, weighs 0), the weights rounded to the kv dtype and the weighted rows summed: one launch per step where
  the reference makes half a dozen.
- `triton_sink_attention`: grid (queries, head tiles). Flash-style online softmax over the key rows allowed to
  the query (the window ring's raw KV, then the compressed entries), started from the head's sink (max = sink,
  denominator 1: the sink is one more logit without a value). K = V, so each key tile is loaded once for both products.
  Rows a query may not see are zeroed before P @ V: a row never written (NaN in the cache) costs nothing. Its per-tile
  step (`sink_softmax_step`) is shared with the paged decode kernel of triton_compressed_attention_paged.py.
- `triton_grouped_linear`: grid (row tiles, groups, output tiles), a K loop over each group's d inputs.

Numerics: float32 accumulation throughout (the reference computes its logits in the activations' dtype: equal in
float32, within bf16 rounding in bf16). Activations float32 / bfloat16 / float16 (float64 stays on the references).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .triton_common import cast, dot


@triton.jit
def _compress_kv_kernel(kv_ptr, gate_ptr, pkv_ptr, pgate_ptr, out_ptr, stride_kn, stride_km, stride_gn, stride_gm,
                        stride_pn, stride_pm, stride_qn, stride_qm, stride_on, m, H, col0, OVERLAP: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, INTERPRET: tl.constexpr):
    w = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    r = tl.arange(0, BLOCK_M)
    ok = (r[:, None] < m) & (h[None, :] < H)
    # This window's rows (CSA: its Cb half, at column offset col0 = H).
    g = tl.load(gate_ptr + w * stride_gn + r[:, None] * stride_gm + col0 + h[None, :], mask=ok,
                other=float("-inf")).to(tl.float32)
    mx = tl.max(g, axis=0)
    if OVERLAP:  # the previous window's Ca half (a gate of -inf where there is none)
        pg = tl.load(pgate_ptr + w * stride_qn + r[:, None] * stride_qm + h[None, :], mask=ok,
                     other=float("-inf")).to(tl.float32)
        mx = tl.maximum(mx, tl.max(pg, axis=0))
    mx = tl.where(mx == float("-inf"), 0.0, mx)  # padding channels (h >= H): every row -inf, weights 0
    e = tl.exp(g - mx[None, :])
    den = tl.sum(e, axis=0)
    if OVERLAP:
        pe = tl.exp(pg - mx[None, :])
        den += tl.sum(pe, axis=0)
    den = tl.where(den == 0.0, 1.0, den)  # padding channels: no row
    kv = tl.load(kv_ptr + w * stride_kn + r[:, None] * stride_km + col0 + h[None, :], mask=ok, other=0.0)
    # The weights rounded to the kv dtype, each product rounded too, as the reference's (kv * weights).sum().
    wt = cast(e / den[None, :], out_ptr.dtype.element_ty, INTERPRET)
    prod = cast(kv.to(tl.float32) * wt.to(tl.float32), out_ptr.dtype.element_ty, INTERPRET)
    acc = tl.sum(tl.where(ok, prod.to(tl.float32), 0.0), axis=0)
    if OVERLAP:
        pkv = tl.load(pkv_ptr + w * stride_pn + r[:, None] * stride_pm + h[None, :], mask=ok, other=0.0)
        pw = cast(pe / den[None, :], out_ptr.dtype.element_ty, INTERPRET)
        prod = cast(pkv.to(tl.float32) * pw.to(tl.float32), out_ptr.dtype.element_ty, INTERPRET)
        acc += tl.sum(tl.where(ok, prod.to(tl.float32), 0.0), axis=0)
    tl.store(out_ptr + w * stride_on + h, cast(acc, out_ptr.dtype.element_ty, INTERPRET), mask=h < H)


def triton_compress_kv(kv_nmC: torch.Tensor, gate_nmC: torch.Tensor, prev_kv_nmH: torch.Tensor | None,
                       prev_gate_nmH: torch.Tensor | None) -> torch.Tensor:
    """Same contract as compressed_attention.reference_compress: [n, H] in kv's dtype (before the entry norm and
    rope)."""
    common.check_dtype("kv_nmC", kv_nmC)
    overlap = prev_kv_nmH is not None
    n, m, C = kv_nmC.shape
    H = prev_kv_nmH.shape[-1] if overlap else C
    if gate_nmC.shape != kv_nmC.shape or (overlap and (C != 2 * H or prev_gate_nmH is None
                                                      or prev_kv_nmH.shape != (n, m, H)
                                                      or prev_gate_nmH.shape != (n, m, H))):
        raise ValueError(f"kv_nmC {tuple(kv_nmC.shape)}, gate_nmC {tuple(gate_nmC.shape)} and prev "
                         f"{None if not overlap else tuple(prev_kv_nmH.shape)} are invalid: must be [n, m, H] rows "
                         "(HCA), or [n, m, 2H] with [n, m, H] previous-window halves (CSA).")
    out = common.workspace((n, H), kv_nmC.dtype, kv_nmC.device)
    if n == 0:
        return out
    kv, gate = kv_nmC.contiguous(), gate_nmC.contiguous()
    pkv = prev_kv_nmH.contiguous() if overlap else kv
    pgate = prev_gate_nmH.contiguous() if overlap else gate
    interp = common.interpreting(kv)
    block_h = min(64, max(16, triton.next_power_of_2(H)))
    _compress_kv_kernel[(n, triton.cdiv(H, block_h))](
        kv, gate, pkv, pgate, out, kv.stride(0), kv.stride(1), gate.stride(0), gate.stride(1), pkv.stride(0),
        pkv.stride(1), pgate.stride(0), pgate.stride(1), out.stride(0), m, H, H if overlap else 0, OVERLAP=overlap,
        BLOCK_M=max(2, triton.next_power_of_2(m)), BLOCK_H=block_h,
        INTERPRET=interp, num_warps=4)
    return out


@triton.jit
def sink_softmax_step(q, k, ok, m_i, l_i, acc, scale, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    """One key tile of the online softmax: q [BLOCK_N, BLOCK_H], k [BLOCK_S, BLOCK_H] (key and value; rows not ok
    already read as zeros), the running max, denominator and output. m_i must be finite (the kernels start it at
    the sink), so a tile of no allowed key changes nothing. Returns (m_i, l_i, acc). Shared with the paged decode
    kernel (triton_compressed_attention_paged.py)."""
    logits = dot(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], tl.float32), INTERPRET, PREC) * scale
    logits = tl.where(ok[None, :], logits, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(logits, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(logits - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = dot(cast(p, k.dtype, INTERPRET), k, acc * alpha[:, None], INTERPRET, PREC)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["S"])
def _sink_attention_kernel(q_ptr, k_ptr, allowed_ptr, sinks_ptr, out_ptr, scale, S, N, H, stride_qt, stride_qn,
                           stride_kt, stride_ks, stride_at, stride_ot, stride_on, BLOCK_N: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, INTERPRET: tl.constexpr,
                           PREC: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_H)
    q = tl.load(q_ptr + t * stride_qt + heads[:, None] * stride_qn + d[None, :],
                mask=(heads[:, None] < N) & (d[None, :] < H), other=0.0)
    # The sink is a logit without a value: the running max starts at it, the denominator at exp(sink - sink) = 1.
    m_i = tl.load(sinks_ptr + heads, mask=heads < N, other=0.0).to(tl.float32)
    l_i = tl.full([BLOCK_N], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_H], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ok = (tl.load(allowed_ptr + t * stride_at + s, mask=s < S, other=0) != 0) & (s < S)
        # Rows the query may not see are read as zeros: an unwritten (NaN) row must not reach P @ V.
        k = tl.load(k_ptr + t * stride_kt + s[:, None] * stride_ks + d[None, :], mask=ok[:, None] & (d[None, :] < H),
        other=0.0)
        m_i, l_i, acc = sink_softmax_step(q, k, ok, m_i, l_i, acc, scale, INTERPRET, PREC)
    out = acc / l_i[:, None]
    tl.store(out_ptr + t * stride_ot + heads[:, None] * stride_on + d[None, :],
             cast(out, out_ptr.dtype.element_ty, INTERPRET), mask=(heads[:, None] < N) & (d[None, :] < H))


def triton_sink_attention(q_TNH: torch.Tensor, k_SH: torch.Tensor, allowed_TS: torch.Tensor, sinks_N: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """Same contract as compressed_attention.reference_sink_attention: out [T, N, H] in q's dtype. allowed_TS bool
    [T, S]; k_SH [S, H] shared, or [T, S, H] per query (a batched decode step)."""
    common.check_dtype("q_TNH", q_TNH)
    T, N, H = q_TNH.shape
    S = k_SH.shape[-2]
    if (k_SH.shape not in ((S, H), (T, S, H)) or allowed_TS.shape != (T, S) or allowed_TS.dtype != torch.bool
            or sinks_N.shape != (N,)):
        raise ValueError(f"k_SH {tuple(k_SH.shape)}, allowed_TS {tuple(allowed_TS.shape)} {allowed_TS.dtype} and "
                         f"sinks_N {tuple(sinks_N.shape)} are invalid: must be [S, {H}], bool [{T}, S] and [{N}].")
    out = common.workspace((T, N, H), q_TNH.dtype, q_TNH.device)
    if T == 0:
        return out
    q = q_TNH if q_TNH.stride(-1) == 1 else q_TNH.contiguous()
    k = k_SH.to(q.dtype).contiguous()
    allowed = allowed_TS.contiguous().view(torch.uint8)
    interp = common.interpreting(q)
    block_n = 16  # the smallest tl.dot tile: V4's 64 / 128 heads are 4 / 8 programs per query
    block_h = max(16, triton.next_power_of_2(H))
    block_s = 16 if interp else (32 if block_h >= 256 else 64)
    _sink_attention_kernel[(T, triton.cdiv(N, block_n))](
        q, k, allowed, sinks_N.float().contiguous(), out, float(scale), S, N, H, q.stride(0), q.stride(1),
        k.stride(0) if k.dim() == 3 else 0, k.stride(-2), allowed.stride(0), out.stride(0), out.stride(1),
        BLOCK_N=block_n, BLOCK_H=block_h,
        BLOCK_S=block_s, INTERPRET=interp, PREC=common.dot_precision(q.dtype),
        num_warps=4 if block_h <= 128 else 8)
    return out


@triton.jit
def _grouped_linear_kernel(x_ptr, w_ptr, out_ptr, T, O, Dg, stride_xt, stride_xg, stride_wg, stride_wo, stride_ot,
                           stride_og, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
                           INTERPRET: tl.constexpr, PREC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    g = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_T, BLOCK_O], tl.float32)
    for k0 in range(0, Dg, BLOCK_K):
        k = k0 + kk
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xt + g * stride_xg + k[None, :],
                    mask=(rows[:, None] < T) & (k[None, :] < Dg), other=0.0)
        w = tl.load(w_ptr + g * stride_wg + cols[None, :].to(tl.int64) * stride_wo + k[:, None],
                    mask=(cols[None, :] < O) & (k[:, None] < Dg), other=0.0)
        acc = dot(x, w, acc, INTERPRET, PREC)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_ot + g * stride_og + cols[None, :],
             cast(acc, out_ptr.dtype.element_ty, INTERPRET), mask=(rows[:, None] < T) & (cols[None, :] < O))


def triton_grouped_linear(x_TGd: torch.Tensor, w_GoD: torch.Tensor) -> torch.Tensor:
    """Same contract as compressed_attention.reference_grouped_linear: [T, G, o] in x's dtype."""
    common.check_dtype("x_TGd", x_TGd)
    T, G, Dg = x_TGd.shape
    if w_GoD.dim() != 3 or w_GoD.shape[0] != G or w_GoD.shape[2] != Dg:
        raise ValueError(f"x_TGd {tuple(x_TGd.shape)} and w_GoD {tuple(w_GoD.shape)} are invalid: must be [T, G, d] "
                         "and [G, o, d].")
    O = w_GoD.shape[1]
    out = common.workspace((T, G, O), x_TGd.dtype, x_TGd.device)
    if T == 0:
        return out
    x = x_TGd if x_TGd.stride(-1) == 1 else x_TGd.contiguous()
    w = w_GoD.to(x.dtype)
    w = w if w.stride(-1) == 1 else w.contiguous()
    interp = common.interpreting(x)
    block_t = 16 if T <= 16 else 64
    block_o, block_k = (16, 16) if interp else (64, 64)
    _grouped_linear_kernel[(triton.cdiv(T, block_t), G, triton.cdiv(O, block_o))](
        x, w, out, T, O, Dg, x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        BLOCK_T=block_t, BLOCK_O=block_o, BLOCK_K=block_k, INTERPRET=interp,
        PREC=common.dot_precision(x.dtype), num_warps=4)
    return out


__all__ = ["sink_softmax_step", "triton_compress_kv", "triton_grouped_linear", "triton_sink_attention"]
