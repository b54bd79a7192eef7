"""MLA over the paged latent cache in Triton: latent write and the absorbed attention kernel (split-K).

Legend as in mla.py: T query tokens, S sequences, N query heads, C latent width (kv_lora_rank), P rope key
width, R = C + P, L block size, Z split-K partitions; latent_cache_BLR = [num_blocks + 1, L, R].

Same semantics as `reference_mla_attention`: the token at position p = seq_len - query_len + i sees cache
rows [0, p]. One kernel serves decode tokens and prefill chunks alike: grid (T, N / BLOCK_H, Z), a program
takes BLOCK_H heads of ONE token as a [BLOCK_H, C] query tile and walks its sequence's block table over
rows [0, p] in BLOCK_N-row tiles. Every head of a token reads the same row (MLA decode is multi-query
attention), so one [BLOCK_N, C] latent tile load feeds BLOCK_H heads twice: as the key of the score dot
(with the [BLOCK_N, P] rope tile) and as the value of the output dot. With one token per program all rows
of a tile share one causal bound, so no per-row mask is needed and a mixed batch is one launch; the
token's sequence is found by binary search over query_start_loc (grid from T alone, no host sync).
A long prompt is better served expanded per head (fewer flops per score, see mla.py); this kernel is the
absorbed path and correct for any mix.

Splits, when the programs alone would leave SMs idle (small decode batches, long contexts):
- a pure-decode batch (every decode graph's step) uses the page-balanced device plan of
  triton_split_plan.py: grid (P, head blocks), P from S, the head blocks and the SM count only, shared among
  the sequences by their row tiles; a program finds its (sequence, split) by binary search over the plan and
  stores a partial; a merge kernel combines each sequence's variable number of partials;
- a mixed batch (eager only) keeps Z > 1 equal slices of every token's rows (grid (T, head blocks, Z)) and a
  per-(token, head block) merge.

An fp8 cache (--kv-cache-dtype fp8): decode tokens read it as it is (each e4m3 row widened to the query's
dtype in registers, the per-layer scale folded into the softmax scale and the output); in a mixed batch the
sequences with a multi-token chunk read their context widened once per chunk into a workspace cache of the
query's dtype (triton_mla_wide.py: per query token, as before, it cost a chunk about Q x its rows'
conversions), so the launch over the fp8 cache and the one over the workspace each serve their own
sequences (SELECT).

The kernel never reads a row at or past the token's causal bound: those loads are masked, so nothing
depends on what unused or null blocks hold (the reference routes such reads to the zeroed null block).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .attention import AttentionMetadata
from .mla import FP8_CACHE_DTYPES, check_latent_cache, check_mla_inputs, check_sinks
from . import triton_mla_wide as wide
from . import triton_split_plan as plan
from .split_planning import decode_programs, pick_splits
from .triton_common import cast, causal_len, dot, seq_of_token

_LOG2E = 1.4426950408889634


@triton.jit
def _write_latent_kernel(ckv_ptr, kpe_ptr, cache_ptr, slot_ptr, stride_ct, stride_pt, C, R, kv_scale,
                         BLOCK: tl.constexpr, INTERPRET: tl.constexpr, FP8: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = (tl.zeros([BLOCK], dtype=tl.int64) + slot) >= 0  # slot -1: a padding token, its row goes nowhere
    is_c = offs < C
    ckv = tl.load(ckv_ptr + t * stride_ct + offs, mask=keep & is_c, other=0.0)
    kpe = tl.load(kpe_ptr + t * stride_pt + (offs - C), mask=keep & ~is_c & (offs < R), other=0.0)
    dt = cache_ptr.dtype.element_ty
    if FP8:  # row / kv_scale, saturated to e4m3's range (a bare cast would make NaN of an out-of-range value)
        val = tl.where(is_c, ckv.to(tl.float32), kpe.to(tl.float32))
        val = tl.div_rn(val, tl.full(val.shape, kv_scale, tl.float32))
        row = cast(tl.minimum(tl.maximum(val, -448.0), 448.0), dt, INTERPRET)
    else:
        row = tl.where(is_c, cast(ckv, dt, INTERPRET), cast(kpe, dt, INTERPRET))
    tl.store(cache_ptr + slot * R + offs, row, mask=keep & (offs < R))


def triton_write_latent(ckv_TC, kpe_TP, latent_cache_BLR, slot_mapping_T, kv_scale: float = 1.0) -> None:
    """Same contract as `reference_write_latent` (in place); slots < 0 are skipped (padding tokens)."""
    T, C = ckv_TC.shape
    if kpe_TP.dim() != 2 or kpe_TP.shape[0] != T:
        raise ValueError(f"kpe_TP {tuple(kpe_TP.shape)} is invalid: must be [{T}, qk_rope_head_dim] like ckv_TC's rows.")
    R = C + kpe_TP.shape[1]
    check_latent_cache("latent_cache_BLR", latent_cache_BLR, R)
    if T == 0:
        return
    # Rows may be strided (slices of the kv_a_proj output); the values within a row must be contiguous.
    ckv_TC = ckv_TC if ckv_TC.stride(1) == 1 else ckv_TC.contiguous()
    kpe_TP = kpe_TP if kpe_TP.stride(1) == 1 else kpe_TP.contiguous()
    BLOCK = min(1024, triton.next_power_of_2(R))
    _write_latent_kernel[(T, triton.cdiv(R, BLOCK))](
        ckv_TC, kpe_TP, latent_cache_BLR, slot_mapping_T, ckv_TC.stride(0), kpe_TP.stride(0), C, R, kv_scale,
        BLOCK=BLOCK, INTERPRET=common.interpreting(ckv_TC), FP8=latent_cache_BLR.dtype in FP8_CACHE_DTYPES, num_warps=4,
    )


@triton.jit
def _mla_attend(ql_ptr, qpe_ptr, cache_ptr, tables_ptr, s_idx, topk_ptr, tok64, hb, start, end, scale_log2, stride_qlt,
                stride_qln, stride_qpt, stride_qpn, stride_cb, stride_cl, stride_tb, stride_kt, num_heads, C, P,
                L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                BLOCK_N: tl.constexpr, SPARSE: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    """The absorbed attention of BLOCK_H heads (head block hb) of token tok64 of sequence s_idx, dense and sparse
    alike: its [BLOCK_H, C] latent and [BLOCK_H, P] rope queries, then an online softmax in exp2 over BLOCK_N-row
    tiles of the cache rows at positions start..end-1 (dense: every tile walked holds at least one visible row,
    start < end), or (SPARSE) at the positions in slots start..end-1 of the token's row of topk_ptr (-1: none; slot
    start holds a selected position). Returns (h, h_ok, c, c_ok, m_i, l_i, acc) for `_mla_store`."""
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # heads past num_heads are padding rows for tl.dot's 16-row minimum
    h_ok = h < num_heads
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    pe = tl.arange(0, BLOCK_P)
    pe_ok = pe < P
    q_lat = tl.load(ql_ptr + tok64 * stride_qlt + h[:, None] * stride_qln + c[None, :],
                    mask=h_ok[:, None] & c_ok[None, :], other=0.0)
    q_pe = tl.load(qpe_ptr + tok64 * stride_qpt + h[:, None] * stride_qpn + pe[None, :],
                   mask=h_ok[:, None] & pe_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    table_ptr = tables_ptr + s_idx.to(tl.int64) * stride_tb
    for s0 in range(start, end, BLOCK_N):
        if SPARSE:
            j = s0 + tl.arange(0, BLOCK_N)
            pos = tl.load(topk_ptr + tok64 * stride_kt + j, mask=j < end, other=-1)
            ok = pos >= 0
        else:
            pos = s0 + tl.arange(0, BLOCK_N)
            ok = pos < end
        blk = tl.load(table_ptr + pos // L, mask=ok, other=0).to(tl.int64)
        row = blk * stride_cb + (pos % L) * stride_cl
        # An fp8 cache widens to the query's dtype exactly (e4m3 ⊂ bf16/fp16); its kv_scale is folded into
        # scale_log2 and the final output, never applied per row.
        kv = tl.load(cache_ptr + row[:, None] + c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0).to(q_lat.dtype)
        kpe = tl.load(cache_ptr + row[:, None] + C + pe[None, :], mask=ok[:, None] & pe_ok[None, :], other=0.0).to(q_lat.dtype)
        # Scores in log2 units (scale folded with log2 e): exp2 is the cheap exponential.
        s = dot(q_lat, tl.trans(kv), tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32), INTERPRET, PREC)
        s = dot(q_pe, tl.trans(kpe), s, INTERPRET, PREC) * scale_log2
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: the tile holds a visible row (docstring)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = dot(cast(p, kv.dtype, INTERPRET), kv, acc * alpha[:, None], INTERPRET, PREC)
        m_i = m_new
    return h, h_ok, c, c_ok, m_i, l_i, acc


@triton.jit
def _sink_log2(sinks_ptr, h, h_ok):
    """The heads' sink logits (MLAConfig.sinks) in the kernels' log2 units; -inf for padding heads."""
    return tl.load(sinks_ptr + h, mask=h_ok, other=float("-inf")).to(tl.float32) * 1.4426950408889634


@triton.jit
def _mla_store(out_ptr, part_o_ptr, part_lse_ptr, tok64, prow_id64, zsplit, h, h_ok, c, c_ok, m_i, l_i, acc, kv_scale,
               stride_ot, stride_on, num_heads, Z, sinks_ptr, BLOCK_C: tl.constexpr, SPLIT: tl.constexpr,
               INTERPRET: tl.constexpr, SINKS: tl.constexpr):
    """`_mla_attend`'s result: the token's output rows, or (SPLIT) split zsplit's partial [.., N, Z, BLOCK_C] and its
    log2-sum-exp2 [.., N, Z] at row prow_id64 (the token, or a plan's work program). An empty split (past the
    token's causal bound or its selected positions, a plan's tail split) stores lse = -inf; split 0 never is.
    SINKS: unsplit, the head's sink joins the denominator here (l += 2^(sink - m), m raised to the sink where it is
    larger); split partials leave it out and the merge adds it once."""
    if SINKS and not SPLIT:
        sink = _sink_log2(sinks_ptr, h, h_ok)
        m_new = tl.maximum(m_i, sink)
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.exp2(sink - m_new)
        acc = acc * alpha[:, None]
    has = l_i > 0
    o = acc * kv_scale / tl.where(has, l_i, 1.0)[:, None]
    if not SPLIT:
        tl.store(out_ptr + tok64 * stride_ot + h[:, None] * stride_on + c[None, :],
                 cast(o, out_ptr.dtype.element_ty, INTERPRET), mask=h_ok[:, None] & c_ok[None, :])
    else:
        prow = (prow_id64 * num_heads + h) * Z + zsplit
        tl.store(part_o_ptr + prow[:, None] * BLOCK_C + c[None, :], o, mask=h_ok[:, None])
        tl.store(part_lse_ptr + prow, tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf")), mask=h_ok)


@triton.jit(do_not_specialize=["num_seqs", "Z"])
def _mla_kernel(ql_ptr, qpe_ptr, cache_ptr, tables_ptr, seq_lens_ptr, qsl_ptr, ends_ptr, sel_ptr, out_ptr, part_o_ptr,
                part_lse_ptr, sinks_ptr, scale_log2, kv_scale, num_seqs, stride_qlt, stride_qln, stride_qpt, stride_qpn,
                stride_cb, stride_cl, stride_tb, stride_ot, stride_on, num_heads, C, P, Z,
                L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, PLAN: tl.constexpr, SELECT: tl.constexpr,
                INTERPRET: tl.constexpr, PREC: tl.constexpr, SINKS: tl.constexpr = False):
    # num_seqs and Z are runtime values (do_not_specialize): a new batch never means a new compile.
    # PLAN (a pure-decode batch, split): program 0 is a work program of the device plan (triton_split_plan.py),
    # which names its sequence (= its one token) and its rows; partials are indexed by work program (Z = 1).
    # Else program 0 is a token and program 2 one of Z equal slices of its rows (Z = 1: no split).
    # SELECT (a mixed batch over an fp8 cache, triton_mla_wide.py): this launch serves only the sequences whose
    # sel entry is >= 0 (the others are another launch's, over another cache); its other programs return.
    hb = tl.program_id(1)
    if PLAN:
        pid = tl.program_id(0)
        s_idx, split, share = plan.find_split(ends_ptr, num_seqs, pid)
        if s_idx >= num_seqs:
            return  # past the plan's last program
        tok = tl.load(qsl_ptr + s_idx)
        seq_len = tl.load(seq_lens_ptr + s_idx)
        first_tile, tiles = plan.seq_tiles(seq_len, 1, 0, BLOCK_N, False)
        start_row, end_row = plan.split_range(seq_len, 0, first_tile, tiles, split, share, BLOCK_N)
        prow_id = pid
        zsplit = 0
    else:
        tok = tl.program_id(0)
        zsplit = tl.program_id(2)
        s_idx = seq_of_token(qsl_ptr, num_seqs, tok)
        if s_idx >= num_seqs:
            return  # past the batch's last token (never from the runner; kept so a stray row reads nothing)
        if SELECT:
            if tl.load(sel_ptr + s_idx) < 0:
                return
        kv_end = causal_len(qsl_ptr, seq_lens_ptr, s_idx, tok)  # the token sees rows [0, its position]
        per_split = tl.cdiv(tl.cdiv(kv_end, Z), BLOCK_N) * BLOCK_N
        start_row = zsplit * per_split
        end_row = tl.minimum(start_row + per_split, kv_end)
        prow_id = tok

    tok64 = tok.to(tl.int64)
    h, h_ok, c, c_ok, m_i, l_i, acc = _mla_attend(
        ql_ptr, qpe_ptr, cache_ptr, tables_ptr, s_idx, qsl_ptr, tok64, hb, start_row, end_row, scale_log2, stride_qlt,
        stride_qln, stride_qpt, stride_qpn, stride_cb, stride_cl, stride_tb, 0, num_heads, C, P, L, BLOCK_H, BLOCK_C,
        BLOCK_P, BLOCK_N, False, INTERPRET, PREC)
    # (PLAN: partials [work programs, N, 1, ...], indexed by work program)
    _mla_store(out_ptr, part_o_ptr, part_lse_ptr, tok64, prow_id.to(tl.int64), zsplit, h, h_ok, c, c_ok, m_i, l_i, acc,
               kv_scale, stride_ot, stride_on, num_heads, Z, sinks_ptr, BLOCK_C, SPLIT, INTERPRET, SINKS)


@triton.jit(do_not_specialize=["Z"])
def _mla_merge_kernel(part_o_ptr, part_lse_ptr, out_ptr, stride_ot, stride_on, num_heads, C, Z, sinks_ptr,
                      BLOCK_H: tl.constexpr, BLOCK_Z: tl.constexpr, BLOCK_C: tl.constexpr, INTERPRET: tl.constexpr,
                      SINKS: tl.constexpr = False):
    """Merge the Z partial softmaxes of BLOCK_H heads of one token by their log-sum-exp: one program per
    (token, head block), so a [BLOCK_H, C] tile moves at a time rather than one head's row. SINKS: each head's sink
    joins the denominator once, here."""
    tok64 = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < num_heads
    c = tl.arange(0, BLOCK_C)
    base = (tok64 * num_heads + h) * Z  # [BLOCK_H]: row of split 0
    z = tl.arange(0, BLOCK_Z)
    lse = tl.load(part_lse_ptr + base[:, None] + z[None, :], mask=h_ok[:, None] & (z[None, :] < Z),
                  other=float("-inf"))
    m = tl.max(lse, axis=1)  # finite: split 0 is never empty
    if SINKS:
        m = tl.maximum(m, _sink_log2(sinks_ptr, h, h_ok))
    m = tl.where(h_ok, m, 0.0)  # padding heads: keep exp2 finite
    total = tl.sum(tl.exp2(lse - m[:, None]), axis=1)
    if SINKS:
        total += tl.where(h_ok, tl.exp2(_sink_log2(sinks_ptr, h, h_ok) - m), 0.0)
    acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    for zi in range(0, Z):
        w = tl.exp2(tl.load(part_lse_ptr + base + zi, mask=h_ok, other=float("-inf")) - m)
        o = tl.load(part_o_ptr + (base + zi)[:, None] * BLOCK_C + c[None, :], mask=h_ok[:, None], other=0.0)
        acc += o * w[:, None]
    o = acc / tl.where(h_ok, total, 1.0)[:, None]
    tl.store(out_ptr + tok64 * stride_ot + h[:, None] * stride_on + c[None, :], cast(o, out_ptr.dtype.element_ty, INTERPRET),
             mask=h_ok[:, None] & (c[None, :] < C))


@triton.jit(do_not_specialize=["num_heads"])
def _mla_merge_plan_kernel(part_o_ptr, part_lse_ptr, ends_ptr, qsl_ptr, out_ptr, stride_ot, stride_on, num_heads, C,
                           sinks_ptr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, INTERPRET: tl.constexpr,
                           SINKS: tl.constexpr = False):
    """Merge one decode sequence's partials (work programs [ends[s-1], ends[s]), a count that varies per
    sequence) for BLOCK_H heads: a pass for the max log2-sum-exp2, a pass to sum the weighted partials (SINKS: and
    each head's sink, once)."""
    s_idx = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < num_heads
    c = tl.arange(0, BLOCK_C)
    tok64 = tl.load(qsl_ptr + s_idx).to(tl.int64)
    start = tl.where(s_idx > 0, tl.load(ends_ptr + s_idx - 1, mask=s_idx > 0, other=0), 0)
    end = tl.load(ends_ptr + s_idx)
    m = tl.load(part_lse_ptr + start.to(tl.int64) * num_heads + h, mask=h_ok, other=0.0)  # split 0: never empty
    for zi in range(start + 1, end):
        m = tl.maximum(m, tl.load(part_lse_ptr + (h + zi * num_heads).to(tl.int64), mask=h_ok, other=float("-inf")))
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    if SINKS:
        sink = _sink_log2(sinks_ptr, h, h_ok)
        m = tl.where(h_ok, tl.maximum(m, sink), m)
        total += tl.where(h_ok, tl.exp2(sink - m), 0.0)
    acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    for zi in range(start, end):
        row = (h + zi * num_heads).to(tl.int64)  # < 2^31: work programs x heads
        w = tl.exp2(tl.load(part_lse_ptr + row, mask=h_ok, other=float("-inf")) - m)
        acc += tl.load(part_o_ptr + row[:, None] * BLOCK_C + c[None, :], mask=h_ok[:, None], other=0.0) * w[:, None]
        total += w
    o = acc / tl.where(h_ok, total, 1.0)[:, None]
    tl.store(out_ptr + tok64 * stride_ot + h[:, None] * stride_on + c[None, :], cast(o, out_ptr.dtype.element_ty, INTERPRET),
             mask=h_ok[:, None] & (c[None, :] < C))


# (BLOCK_H, BLOCK_N, num_warps, num_stages) on sm_90, from the offline compile (Triton 3.9, DeepSeek-V3
# shapes: C 512, P 64; `python -m moelink.benchmarks.compile_report --only mla`). The [BLOCK_H, 512] fp32
# accumulator is what fills the registers. bf16/fp16: 32 heads x 64 rows on 8 warps, 172 registers (198
# split), 112 KB shared, no spills, mma.sync. 64 heads (what wgmma needs per warpgroup, and half the latent
# re-reads of 32) spills on every variant tried (4-32 B on 8 warps, KBs on 4; on 16 warps registers cap at
# 128 and ptxas gives up); 32 heads on 4 warps spills 144 B. fp32 dots are FMA loops (no tensor cores): 16
# heads x 16 rows on 8 warps, 114 registers (32 rows spill 36-60 B split). Not yet timed on a GPU: bf16
# (16, 32, 4, 3) and (32, 32, 8, 3) also compile clean. Under Triton 3.6 (the GPU image's) the split variant
# of (32, 64, 8, 2) reaches 255 registers and spills 104 B (the partial-LSE epilogue's extra live values),
# so split launches take 32-row tiles: (32, 32, 8, 2).
_CONFIG = (32, 64, 8, 2)
_SPLIT_CONFIG = (32, 32, 8, 2)
_FP32_CONFIG = (16, 16, 8, 2)
# An fp8 latent cache holds each tile twice for a while (the e4m3 load and its bf16 widening): with 32 heads
# the kernel reaches 255 registers and spills 8 B (16 B split) on sm_90 under Triton 3.6 at 64, 32 and 16
# rows alike (the [heads, 512] accumulator dominates); 16 heads compile clean, at twice the latent re-reads.
_FP8_CACHE_CONFIG = (16, 32, 8, 2)
_FP8_CACHE_SPLIT_CONFIG = (16, 32, 8, 2)


def _launch_config(dtype: torch.dtype, interpret: bool, num_heads: int, split: bool = False,
                   fp8_cache: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_N, num_warps, num_stages); BLOCK_H shrinks to the head count (>= 16 rows for tl.dot)."""
    if interpret:
        block_h, block_n, warps, stages = 16, 16, 4, 1
    elif dtype == torch.float32:
        block_h, block_n, warps, stages = _FP32_CONFIG
    elif fp8_cache:
        block_h, block_n, warps, stages = _FP8_CACHE_SPLIT_CONFIG if split else _FP8_CACHE_CONFIG
    else:
        block_h, block_n, warps, stages = _SPLIT_CONFIG if split else _CONFIG
    return min(block_h, max(16, triton.next_power_of_2(num_heads))), block_n, warps, stages


def triton_mla_attention(
    q_latent_TNC: torch.Tensor, q_pe_TNP: torch.Tensor, latent_cache_BLR: torch.Tensor, meta: AttentionMetadata,
    scale: float, kv_scale: float = 1.0, *, sinks_N: torch.Tensor | None = None, out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Same contract as `reference_mla_attention` (sinks_N too): out_latent_TNC [T, N, C] in q's dtype.

    Reads only the metadata's host lists and device tensors (no device→host sync). q_latent_TNC and q_pe_TNP
    may be strided views (e.g. a per-head bmm's transposed output) with contiguous last dims; `out` (any
    [T, N, C] strides with a contiguous last dim, e.g. a transposed [N, T, C] buffer for the W_UV bmm)
    receives the result. `num_splits` forces the split (tests): num_splits x S plan programs for a pure-decode
    batch, Z = num_splits slices in a mixed one; by default splits happen only when the programs alone would
    leave SMs idle.
    """
    common.check_dtype("q_latent_TNC", q_latent_TNC)
    check_mla_inputs(q_latent_TNC, q_pe_TNP, latent_cache_BLR)
    T, N, C = q_latent_TNC.shape
    P = q_pe_TNP.shape[2]
    check_sinks(sinks_N, N)
    if out is None:
        out = common.workspace((T, N, C), q_latent_TNC.dtype, q_latent_TNC.device)
    elif tuple(out.shape) != (T, N, C) or out.dtype != q_latent_TNC.dtype or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} is invalid: must be [{T}, {N}, {C}] {q_latent_TNC.dtype} "
                         "with a contiguous last dim.")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits={num_splits} is invalid: must be >= 1 (or None to pick).")
    if T == 0:
        return out
    q_latent_TNC = q_latent_TNC if q_latent_TNC.stride(-1) == 1 else q_latent_TNC.contiguous()
    q_pe_TNP = q_pe_TNP if q_pe_TNP.stride(-1) == 1 else q_pe_TNP.contiguous()
    dev, dt = q_latent_TNC.device, q_latent_TNC.dtype
    interp = common.interpreting(q_latent_TNC)
    fp8_cache = latent_cache_BLR.dtype in FP8_CACHE_DTYPES
    BLOCK_C = max(16, triton.next_power_of_2(C))
    S = meta.num_seqs
    sinks = sinks_N if sinks_N is not None else out  # a placeholder pointer when there are none (never read)

    def launch(grid, cache, tables, ends, sel, part_o, part_lse, cfg, split: bool, plan_split: bool) -> None:
        block_h, block_n, warps, stages = cfg
        _mla_kernel[grid](
            q_latent_TNC, q_pe_TNP, cache, tables, meta.seq_lens_S, meta.query_start_loc_S1, ends,
            sel if sel is not None else ends, out, part_o, part_lse, sinks, scale * kv_scale * _LOG2E, kv_scale, S,
            q_latent_TNC.stride(0), q_latent_TNC.stride(1), q_pe_TNP.stride(0), q_pe_TNP.stride(1), cache.stride(0),
            cache.stride(1), tables.stride(0), out.stride(0), out.stride(1), N, C, P, grid[2], L=cache.shape[1],
            BLOCK_H=block_h, BLOCK_C=BLOCK_C, BLOCK_P=max(16, triton.next_power_of_2(P)), BLOCK_N=block_n,
            SPLIT=split, PLAN=plan_split, SELECT=sel is not None, INTERPRET=interp, PREC=common.dot_precision(dt),
            SINKS=sinks_N is not None, num_warps=warps, num_stages=stages)

    if meta.max_query_len == 1:
        # Pure decode (every step a decode graph replays): the device plan shares P work programs per head block
        # among the sequences by their row tiles; P from S, the head blocks and the SMs only (S: no split).
        cfg = _launch_config(dt, interp, N, fp8_cache=fp8_cache)
        split_cfg = _launch_config(dt, interp, N, split=True, fp8_cache=fp8_cache)
        programs = S * num_splits if num_splits else decode_programs(dev, S, triton.cdiv(N, cfg[0]), split_cfg[1])
        if programs == S:
            launch((S, triton.cdiv(N, cfg[0]), 1), latent_cache_BLR, meta.block_tables_SM, out, None, out, out, cfg,
                   False, False)
            return out
        head_blocks = triton.cdiv(N, split_cfg[0])
        ends = plan.plan_decode_splits(meta.seq_lens_S, meta.query_start_loc_S1, programs, split_cfg[1])
        part_o = common.workspace((programs, N, 1, BLOCK_C), torch.float32, dev)
        part_lse = common.workspace((programs, N, 1), torch.float32, dev)
        launch((programs, head_blocks, 1), latent_cache_BLR, meta.block_tables_SM, ends, None, part_o, part_lse,
               split_cfg, True, True)
        _mla_merge_plan_kernel[(S, head_blocks)](
            part_o, part_lse, ends, meta.query_start_loc_S1, out, out.stride(0), out.stride(1), N, C, sinks,
            BLOCK_H=split_cfg[0], BLOCK_C=BLOCK_C, INTERPRET=interp, SINKS=sinks_N is not None, num_warps=8)
        return out
    # A mixed batch (eager): Z equal slices of every token's rows when the tokens leave SMs idle. Over an fp8
    # cache, the sequences with a chunk of several tokens read their context widened once
    # (triton_mla_wide.py), one launch per workspace pass beside the launch over the fp8 cache for the decodes;
    # every launch writes its own tokens (or their partials: the merge runs once, after all of them).
    cfg = _launch_config(dt, interp, N, fp8_cache=fp8_cache)
    Z = num_splits or pick_splits(dev, T * triton.cdiv(N, cfg[0]), meta.max_seq_len, cfg[1])
    part_o = part_lse = out  # unused without a split
    if Z > 1:
        part_o = common.workspace((T, N, Z, BLOCK_C), torch.float32, dev)
        part_lse = common.workspace((T, N, Z), torch.float32, dev)
    srcs = wide.sources(latent_cache_BLR, meta, dt) if fp8_cache else [(latent_cache_BLR, meta.block_tables_SM, None)]
    for cache, tables, sel in srcs:
        c = _launch_config(dt, interp, N, split=Z > 1, fp8_cache=cache.dtype in FP8_CACHE_DTYPES)
        launch((T, triton.cdiv(N, c[0]), Z), cache, tables, out, sel, part_o, part_lse, c, Z > 1, False)
    if Z > 1:  # every (token, head) has split 0 written: merge them all
        block_h = _launch_config(dt, interp, N, split=True)[0]
        _mla_merge_kernel[(T, triton.cdiv(N, block_h))](
            part_o, part_lse, out, out.stride(0), out.stride(1), N, C, Z, sinks, BLOCK_H=block_h,
            BLOCK_Z=triton.next_power_of_2(Z), BLOCK_C=BLOCK_C, INTERPRET=interp, SINKS=sinks_N is not None,
            num_warps=8)
    return out
