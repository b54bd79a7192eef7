"""The merges of the paged-attention split-K partials (Triton): each (row, head)'s partial softmaxes combined by
their log-sum-exp, the sink logit added once. `_merge_plan_kernel` merges the decode kernel's variable number of
partials per sequence (the device split plan); `_merge_splits_kernel` the split prefill kernel's Z per token.
Split out of triton_attention.py, which launches them."""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import cast


@triton.jit
def _merge_plan_kernel(part_o_ptr, part_lse_ptr, ends_ptr, qsl_ptr, out_ptr, sinks_ptr, stride_ot, stride_on,
                       num_heads, head_dim, BLOCK_Z: tl.constexpr, BLOCK_H: tl.constexpr, SINKS: tl.constexpr,
                       INTERPRET: tl.constexpr):
    """Merge one decode sequence's partials (work programs [ends[s-1], ends[s]), a count that varies per
    sequence) for one head by their log-sum-exp, BLOCK_Z at a time with a running max; with SINKS the head's
    sink logit joins the denominator once, here. Prefill sequences are skipped."""
    s_idx = tl.program_id(0)
    head = tl.program_id(1)
    tok = tl.load(qsl_ptr + s_idx).to(tl.int64)
    if tl.load(qsl_ptr + s_idx + 1) - tok != 1:
        return
    start = tl.where(s_idx > 0, tl.load(ends_ptr + s_idx - 1, mask=s_idx > 0, other=0), 0)
    end = tl.load(ends_ptr + s_idx)
    d = tl.arange(0, BLOCK_H)
    # Split 0 is never empty (it holds the window's first key, or key 0): a finite running max from the start.
    m = tl.load(part_lse_ptr + start.to(tl.int64) * num_heads + head)
    denom = m * 0
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for z0 in range(start, end, BLOCK_Z):
        z = z0 + tl.arange(0, BLOCK_Z)
        ok = z < end
        row = z.to(tl.int64) * num_heads + head
        lse = tl.load(part_lse_ptr + row, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        alpha = tl.exp(m - m_new)
        w = tl.exp(lse - m_new)
        o = tl.load(part_o_ptr + row[:, None] * BLOCK_H + d[None, :], mask=ok[:, None], other=0.0)
        acc = acc * alpha + tl.sum(o * w[:, None], axis=0)
        denom = denom * alpha + tl.sum(w, axis=0)
        m = m_new
    if SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32)
        m_new = tl.maximum(m, sink)
        alpha = tl.exp(m - m_new)
        acc = acc * alpha
        denom = denom * alpha + tl.exp(sink - m_new)
    tl.store(out_ptr + tok * stride_ot + head * stride_on + d, cast(acc / denom, out_ptr.dtype.element_ty, INTERPRET),
             mask=d < head_dim)


@triton.jit
def _merge_splits_kernel(part_o_ptr, part_lse_ptr, out_ptr, sinks_ptr, stride_ot, stride_on, num_heads,
                         head_dim, Z, BLOCK_Z: tl.constexpr, BLOCK_H: tl.constexpr, SINKS: tl.constexpr,
                         INTERPRET: tl.constexpr):
    """Merge the split prefill kernel's Z partial softmaxes ([T, N, Z]) of one (token, head) by their
    log-sum-exp; with SINKS the head's sink logit joins the denominator once, here. Some split holds the
    row's own key, so the max below is finite."""
    idx = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    tok = idx
    z = tl.arange(0, BLOCK_Z)
    d = tl.arange(0, BLOCK_H)
    row = (idx * num_heads + head) * Z + z
    lse = tl.load(part_lse_ptr + row, mask=z < Z, other=float("-inf"))
    m = tl.max(lse, axis=0)
    if SINKS:
        m = tl.maximum(m, tl.load(sinks_ptr + head).to(tl.float32))
    w = tl.exp(lse - m)
    o = tl.load(part_o_ptr + row[:, None] * BLOCK_H + d[None, :], mask=(z[:, None] < Z), other=0.0)
    denom = tl.sum(w, axis=0)
    if SINKS:
        denom += tl.exp(tl.load(sinks_ptr + head).to(tl.float32) - m)
    o = tl.sum(o * w[:, None], axis=0) / denom
    tl.store(out_ptr + tok * stride_ot + head * stride_on + d, cast(o, out_ptr.dtype.element_ty, INTERPRET),
             mask=d < head_dim)
