"""Attention over the paged KV cache in Triton: KV write, page-balanced split decode, varlen causal prefill.

Legend: T query tokens in the flat batch, S sequences, N query heads, K kv
heads, G = N/K query heads per kv head, H head dim, Hv value head dim (H but for
MiMo-V2-Flash's narrower values), L block size, M max blocks per sequence, P
decode work programs per kv head, Z prefill split-K partitions.
Cache layout as in attention.py:
k_cache_BLKH = [num_blocks + 1, L, K, H], v_cache_BLKH = [num_blocks + 1, L, K, Hv];
the output, the accumulators and the split partials are Hv wide.

Same semantics as `reference_paged_attention`: the query at position
p = seq_len - query_len + i sees keys [0, p]. The kernels never read a key at
or past seq_len: those loads are masked, so nothing depends on what unused or
null blocks hold (the reference routes such reads to the zeroed null block
instead; both see only the first seq_len keys).

- Decode (query_len == 1): grid (P, K). Each program takes the G query
  heads of one kv head (one K/V load serves them all). When S·K fills the SMs,
  P = S and program s is sequence s, whole (no partials). Else P (from S, K and
  the SM count only: `split_planning.decode_programs`) work programs are shared
  among the sequences in proportion to their key tiles, at least one each, by a
  plan computed on the device from seq_lens (`triton_split_plan.py`: a prefix
  sum, no host sync); a program finds its (sequence, split) by binary search
  over the plan, walks its tile-aligned key range and stores a partial, and a
  merge kernel combines each sequence's variable number of partials by their
  log-sum-exp. One long context among short ones thus gets most programs, and
  a captured graph's plan follows each replay's lengths.
- Prefill (query_len > 1): grid (q blocks, K, Zp). A program takes BLOCK_Q query
  tokens × G heads as one [BLOCK_Q·G, H] tile and walks the sequence's block
  table over the cached prefix and the chunk itself, causal-masked. The
  sequence of a q block is found by binary search over query_start_loc, so the
  grid comes from T and S alone (no host sync). When the q blocks alone would
  leave SMs idle (short chunks over long cached prefixes), Zp > 1 splits the
  keys as decode does and a per-token reduce merges the partials.
A mixed batch runs both: each kernel skips the other's sequences on the device
(with Zp > 1 the prefill kernel takes the decode sequences too: a small step).

gpt-oss's per-layer extras (attention.py's docstring has their semantics), both graph-safe:
- sliding_window W (a runtime int; WINDOW, a constexpr, says whether there is one, so a model compiles two
  variants at most): the key loop starts at the window's first key of the program's first query (decode:
  seq_len - W; the plan counts the tiles of [that, seq_len) only), and each row masks keys <= its position - W.
  A split then may hold no key a row sees: its lse is -inf and the merge weighs it 0 (every row sees itself).
- sinks_N (SINKS): after the key loop the sink joins the denominator, l += e^(sink - m) with m raised to the
  sink where it is larger; split partials leave it out and the merge adds it once.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from . import triton_common as common
from . import split_planning as splits
from . import triton_split_plan as plan
from .attention import FP8_CACHE_DTYPES, AttentionMetadata, _check_extras
from .triton_common import cast, dot
from .triton_attention_merge import _merge_plan_kernel, _merge_splits_kernel
from .triton_kv_write import triton_write_kv  # noqa: F401  (re-exported: the attention kernels' public pair)


@triton.jit
def _attend_tile(q, m_i, l_i, acc, kc_ptr, vc_ptr, table_ptr, kv_head, start, kv_end, q_pos, scale, window,
                 stride_cb, stride_cl, stride_ck, stride_vb, stride_vl, stride_vk, head_dim, v_head_dim,
                 ROWS: tl.constexpr, L: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_HV: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, INTERPRET: tl.constexpr,
                 PREC: tl.constexpr):
    """One step of the online softmax over keys [start, start + BLOCK_N) ∩ [0, kv_end); with WINDOW, a row at
    q_pos sees only keys > q_pos - window (decode passes its one position as q_pos for every row)."""
    pos = start + tl.arange(0, BLOCK_N)
    p_ok = pos < kv_end
    d = tl.arange(0, BLOCK_H)
    d_ok = d < head_dim
    blk = tl.load(table_ptr + pos // L, mask=p_ok, other=0).to(tl.int64)
    off = blk * stride_cb + (pos % L) * stride_cl + kv_head * stride_ck
    # An fp8 cache widens exactly to the query's dtype (e4m3 ⊂ bf16/fp16/fp32); the wrapper folds k_scale into
    # `scale` and the kernels apply v_scale to the output, never per loaded row. A no-op for a same-dtype cache.
    k = tl.load(kc_ptr + off[None, :] + d[:, None], mask=p_ok[None, :] & d_ok[:, None], other=0.0).to(q.dtype)
    s = dot(q, k, tl.zeros([ROWS, BLOCK_N], dtype=tl.float32), INTERPRET, PREC) * scale
    ok = p_ok[None, :]
    if CAUSAL:
        ok = ok & (pos[None, :] <= q_pos[:, None])
    if WINDOW:
        ok = ok & (pos[None, :] > q_pos[:, None] - window)
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: keep exp() finite
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    dv = tl.arange(0, BLOCK_HV)
    v_off = blk * stride_vb + (pos % L) * stride_vl + kv_head * stride_vk
    v = tl.load(vc_ptr + v_off[:, None] + dv[None, :], mask=p_ok[:, None] & (dv < v_head_dim)[None, :],
                other=0.0).to(q.dtype)
    acc = dot(cast(p, v.dtype, INTERPRET), v, acc * alpha[:, None], INTERPRET, PREC)
    return m_new, l_i, acc


@triton.jit
def _add_sink(m_i, l_i, acc, sinks_ptr, head, head_ok):
    """The sink logit joins the softmax denominator (no value): rescale to max(m, sink) and add e^(sink - m)."""
    sink = tl.load(sinks_ptr + head, mask=head_ok, other=float("-inf")).to(tl.float32)
    m_new = tl.maximum(m_i, sink)
    m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_new)
    return l_i * alpha + tl.exp(sink - m_new), acc * alpha[:, None]


@triton.jit(do_not_specialize=["num_seqs"])
def _decode_kernel(q_ptr, kc_ptr, vc_ptr, tables_ptr, seq_lens_ptr, qsl_ptr, ends_ptr, out_ptr, part_o_ptr, part_lse_ptr,
                   sinks_ptr, scale, window, v_scale, num_seqs, stride_qt, stride_qn, stride_cb, stride_cl, stride_ck,
                   stride_vb, stride_vl, stride_vk, stride_tb, stride_ot, stride_on, num_heads, head_dim, v_head_dim,
                   G: tl.constexpr, L: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_HV: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, WINDOW: tl.constexpr,
                   SINKS: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    # SPLIT: program 0 is a work program of the device plan (triton_split_plan.py), which names its sequence
    # and split; else it is the sequence, whole. num_seqs is a runtime value: a new batch is no new compile.
    p = tl.program_id(0)
    kv_head = tl.program_id(1)
    if SPLIT:
        s_idx, split, share = plan.find_split(ends_ptr, num_seqs, p)
        if s_idx >= num_seqs:
            return  # past the plan's last program (it used fewer than the grid has)
    else:
        s_idx = p
    q_start = tl.load(qsl_ptr + s_idx)
    if tl.load(qsl_ptr + s_idx + 1) - q_start != 1:
        return  # a prefill chunk: the prefill kernel's
    seq_len = tl.load(seq_lens_ptr + s_idx)
    kv_lo = seq_len * 0
    if WINDOW:
        kv_lo = tl.maximum(seq_len - window, 0)  # the query at seq_len - 1 sees keys > seq_len - 1 - window
    lo = kv_lo
    hi = seq_len
    if SPLIT:
        first_tile, tiles = plan.seq_tiles(seq_len, 1, window, BLOCK_N, WINDOW)
        lo, hi = plan.split_range(seq_len, kv_lo, first_tile, tiles, split, share, BLOCK_N)
    g = tl.arange(0, BLOCK_G)
    head = kv_head * G + g
    d = tl.arange(0, BLOCK_H)
    q_ok = (g[:, None] < G) & (d[None, :] < head_dim)
    q = tl.load(q_ptr + q_start.to(tl.int64) * stride_qt + head[:, None] * stride_qn + d[None, :], mask=q_ok, other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_HV], dtype=tl.float32)
    table_ptr = tables_ptr + s_idx.to(tl.int64) * stride_tb
    q_pos = g * 0 + seq_len - 1
    for start in range(lo, hi, BLOCK_N):
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, kc_ptr, vc_ptr, table_ptr, kv_head, start, hi, q_pos, scale,
                                     window, stride_cb, stride_cl, stride_ck, stride_vb, stride_vl, stride_vk,
                                     head_dim, v_head_dim, BLOCK_G, L, BLOCK_N, BLOCK_H, BLOCK_HV, False, WINDOW,
                                     INTERPRET, PREC)
    dv = tl.arange(0, BLOCK_HV)
    if not SPLIT:
        if SINKS:
            l_i, acc = _add_sink(m_i, l_i, acc, sinks_ptr, head, g < G)
        o = acc * v_scale / l_i[:, None]
        o_ptrs = out_ptr + q_start.to(tl.int64) * stride_ot + head[:, None] * stride_on + dv[None, :]
        tl.store(o_ptrs, cast(o, out_ptr.dtype.element_ty, INTERPRET), mask=(g[:, None] < G) & (dv[None, :] < v_head_dim))
    else:
        # Partials [P, N, Hv] and their log-sum-exp [P, N], by work program; an empty split stores lse = -inf.
        row = p.to(tl.int64) * num_heads + head
        has = l_i > 0
        o = acc * v_scale / tl.where(has, l_i, 1.0)[:, None]
        tl.store(part_o_ptr + row[:, None] * BLOCK_HV + dv[None, :], o, mask=g[:, None] < G)
        tl.store(part_lse_ptr + row, tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf")), mask=g < G)


@triton.jit
def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, tables_ptr, seq_lens_ptr, qsl_ptr, out_ptr, part_o_ptr, part_lse_ptr,
                    sinks_ptr, scale, window, v_scale, num_seqs, stride_qt, stride_qn, stride_cb, stride_cl, stride_ck,
                    stride_vb, stride_vl, stride_vk, stride_tb, stride_ot, stride_on, num_heads, head_dim, v_head_dim, Z,
                    G: tl.constexpr, L: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_HV: tl.constexpr, BLOCK_N: tl.constexpr, SKIP_DECODE: tl.constexpr,
                    SPLIT: tl.constexpr, WINDOW: tl.constexpr, SINKS: tl.constexpr, INTERPRET: tl.constexpr,
                    PREC: tl.constexpr):
    qb = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # Sequence s owns q blocks [qsl[s] // BLOCK_Q + s, qsl[s+1] // BLOCK_Q + s + 1): a
    # bound on its ceil(len / BLOCK_Q) blocks that needs no prefix sum. Binary search.
    lo = qb * 0  # int32 tensors from the start: loop-carried, and num_seqs may be specialised to a constant
    hi = lo + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= qb:
            lo = mid + 1
        else:
            hi = mid
    s_idx = lo - 1
    q_start = tl.load(qsl_ptr + s_idx)
    q_len = tl.load(qsl_ptr + s_idx + 1) - q_start
    local_qb = qb - (q_start // BLOCK_Q + s_idx)
    if local_qb * BLOCK_Q >= q_len:
        return
    if SKIP_DECODE:
        if q_len == 1:
            return  # the decode kernel's
    seq_len = tl.load(seq_lens_ptr + s_idx)
    prefix = seq_len - q_len
    r = tl.arange(0, BLOCK_Q * BLOCK_G)
    q_idx = local_qb * BLOCK_Q + r // BLOCK_G
    g = r % BLOCK_G
    head = kv_head * G + g
    row_ok = (q_idx < q_len) & (g < G)
    d = tl.arange(0, BLOCK_H)
    io_ok = row_ok[:, None] & (d[None, :] < head_dim)
    tok = (q_start + q_idx).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qn + d[None, :], mask=io_ok, other=0.0)
    q_pos = prefix + q_idx
    kv_end = tl.minimum(seq_len, prefix + (local_qb + 1) * BLOCK_Q)
    m_i = tl.full([BLOCK_Q * BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_HV], dtype=tl.float32)
    table_ptr = tables_ptr + s_idx.to(tl.int64) * stride_tb
    # With a window the block's first query sees keys from prefix + local_qb * BLOCK_Q - window + 1 on.
    kv_lo = kv_end * 0
    if WINDOW:
        kv_lo = tl.maximum(prefix + local_qb * BLOCK_Q - window + 1, 0)
    # Split-K (SPLIT): this program takes a 1/Z slice of the keys the q block sees.
    per_split = tl.cdiv(tl.cdiv(kv_end - kv_lo, Z), BLOCK_N) * BLOCK_N
    lo = kv_lo + split * per_split
    hi = tl.minimum(lo + per_split, kv_end)
    for start in range(lo, hi, BLOCK_N):
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, kc_ptr, vc_ptr, table_ptr, kv_head, start, hi, q_pos,
                                     scale, window, stride_cb, stride_cl, stride_ck, stride_vb, stride_vl, stride_vk,
                                     head_dim, v_head_dim, BLOCK_Q * BLOCK_G, L, BLOCK_N, BLOCK_H, BLOCK_HV, True,
                                     WINDOW, INTERPRET, PREC)
    if SINKS:
        if not SPLIT:
            l_i, acc = _add_sink(m_i, l_i, acc, sinks_ptr, head, g < G)
    has = l_i > 0
    o = acc * v_scale / tl.where(has, l_i, 1.0)[:, None]
    dv = tl.arange(0, BLOCK_HV)
    if not SPLIT:
        o_ptrs = out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_on + dv[None, :]
        tl.store(o_ptrs, cast(o, out_ptr.dtype.element_ty, INTERPRET), mask=row_ok[:, None] & (dv[None, :] < v_head_dim))
    else:
        # Token-indexed partials [T, N, Z, Hv] and lse [T, N, Z]. A row that sees no key of this slice
        # (causal: the slice starts after it; a window: it ends before) stores lse = -inf; some split holds
        # the row's own key, so the merge never sees -inf everywhere.
        row = (tok * num_heads + head) * Z + split
        tl.store(part_o_ptr + row[:, None] * BLOCK_HV + dv[None, :], o, mask=row_ok[:, None])
        tl.store(part_lse_ptr + row, tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf")), mask=row_ok)


# (BLOCK_N, num_warps) of the fp32 decode kernel (compiled only: the interpreter keeps its 16-key tiles). fp32
# dots are FMA loops that hold their operands in registers: 64-key tiles on 4 warps spill on sm_90 (Triton 3.9:
# ~830 B at head dim 128; 3.6: 2 KB at head dim 256), 8 warps alone still spill 12 B under 3.6; 32-key tiles on
# 8 warps spill in no head layout under either (benchmarks/results/compile_report_sm90*.md).
_FP32_DECODE = (32, 8)


def paged_shapes(q_TNH: torch.Tensor, k_cache_BLKH: torch.Tensor,
                 v_cache_BLKH: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """(T, N, H, L, K, Hv) of a paged attention call, its query and caches checked to fit (every paged attention
    wrapper's contract: contiguous [blocks, L, K, H] / [blocks, L, K, Hv] caches, N a multiple of K)."""
    common.check_dtype("q_TNH", q_TNH)
    T, N, H = q_TNH.shape
    _, L, K, _ = k_cache_BLKH.shape
    Hv = v_cache_BLKH.shape[3]
    if (N % K or k_cache_BLKH.shape[3] != H or v_cache_BLKH.shape[:3] != k_cache_BLKH.shape[:3]
            or not k_cache_BLKH.is_contiguous() or not v_cache_BLKH.is_contiguous()):
        raise ValueError(f"q_TNH {tuple(q_TNH.shape)} and caches {tuple(k_cache_BLKH.shape)} / "
                         f"{tuple(v_cache_BLKH.shape)} do not fit: need contiguous [blocks, L, K, {H}] and "
                         f"[blocks, L, K, Hv] caches with N a multiple of K.")
    return T, N, H, L, K, Hv


def _warps(rows: int, block_h: int) -> int:
    """4 warps for the common tiles (<= 64 query rows x head dim 128); 8 for head dim 256 or 128+ rows,
    where 4 warps run out of registers and spill (seen in the sm_90 compile: 255 registers + stack)."""
    return 8 if block_h >= 256 or rows >= 128 else 4


def _paged_out(q_TNH: torch.Tensor, out: torch.Tensor | None, T: int, N: int, Hv: int) -> torch.Tensor:
    """The result's buffer: the caller's `out` once checked to be [T, N, Hv] in q's dtype (rows contiguous), else a
    workspace."""
    if out is None:
        return common.workspace((T, N, Hv), q_TNH.dtype, q_TNH.device)
    if tuple(out.shape) != (T, N, Hv) or out.dtype != q_TNH.dtype or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} is invalid: must be [{T}, {N}, {Hv}] {q_TNH.dtype}.")
    return out


def _check_cache_dtypes(q_TNH: torch.Tensor, k_cache_BLKH: torch.Tensor, v_cache_BLKH: torch.Tensor) -> None:
    """The kernels read a cache in the query's dtype, or an fp8 one (K and V both) scaled by k_scale / v_scale."""
    if k_cache_BLKH.dtype != q_TNH.dtype and (k_cache_BLKH.dtype not in FP8_CACHE_DTYPES
                                              or v_cache_BLKH.dtype != k_cache_BLKH.dtype):
        raise ValueError(f"cache dtypes {k_cache_BLKH.dtype} / {v_cache_BLKH.dtype} are invalid for q_TNH "
                         f"{q_TNH.dtype}: the cache holds the query's dtype, or float8_e4m3fn for both K and V.")


def triton_paged_attention(
    q_TNH: torch.Tensor, k_cache_BLKH: torch.Tensor, v_cache_BLKH: torch.Tensor, meta: AttentionMetadata,
    scale: float, *, sinks_N: torch.Tensor | None = None, sliding_window: int | None = None,
    k_scale: float = 1.0, v_scale: float = 1.0, out: torch.Tensor | None = None, num_splits: int | None = None,
    prefill_splits: int | None = None,
) -> torch.Tensor:
    """Same contract as `reference_paged_attention` (sinks_N, sliding_window, an fp8 cache's k_scale / v_scale
    included): [T, N, Hv] in q's dtype (Hv: the V cache's head dim).

    Reads only the metadata's host lists and device tensors (no device→host sync); the decode path reads no
    host length (its plan is the device's). `num_splits` forces the decode plan to num_splits x S work
    programs per kv head (1: no split), `prefill_splits` the prefill split count (tests; a prefill split > 1
    also takes the batch's decode sequences); `out` receives the result.
    """
    T, N, H, L, K, Hv = paged_shapes(q_TNH, k_cache_BLKH, v_cache_BLKH)
    out = _paged_out(q_TNH, out, T, N, Hv)
    _check_extras(q_TNH, sinks_N, sliding_window)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits={num_splits} is invalid: must be >= 1 (or None to plan).")
    if T == 0:
        return out
    q_TNH = q_TNH if q_TNH.stride(-1) == 1 else q_TNH.contiguous()
    extras = dict(WINDOW=sliding_window is not None, SINKS=sinks_N is not None)
    window = sliding_window or 0
    _check_cache_dtypes(q_TNH, k_cache_BLKH, v_cache_BLKH)
    scale, v_scale = float(scale) * float(k_scale), float(v_scale)  # k_scale folds into the softmax scale
    sinks = sinks_N if sinks_N is not None else out  # a placeholder pointer when there are none (never read)
    G = N // K
    S = meta.num_seqs
    dev = q_TNH.device
    flags = dict(INTERPRET=common.interpreting(q_TNH), PREC=common.dot_precision(q_TNH.dtype))
    BLOCK_H = max(16, triton.next_power_of_2(H))
    BLOCK_HV = max(16, triton.next_power_of_2(Hv))
    BLOCK_N = 16 if flags["INTERPRET"] else 64
    fp32 = q_TNH.dtype == torch.float32  # fp32 dots are FMA loops (no tensor cores): see _FP32_DECODE
    tables = meta.block_tables_SM
    common_args = (q_TNH, k_cache_BLKH, v_cache_BLKH, tables, meta.seq_lens_S, meta.query_start_loc_S1)
    cache_strides = (k_cache_BLKH.stride(0), k_cache_BLKH.stride(1), k_cache_BLKH.stride(2), v_cache_BLKH.stride(0),
                     v_cache_BLKH.stride(1), v_cache_BLKH.stride(2), tables.stride(0))
    has_decode = min(meta.query_lens) == 1
    Zp = 1
    if meta.max_query_len > 1:
        BLOCK_G = triton.next_power_of_2(G)
        # Aim for ~64-row tiles (16 in the interpreter); at least 16 rows for tl.dot. fp32 dots are FMA loops,
        # not tensor cores, and hold their operands in registers: 16-row tiles on 8 warps, the fp32 tile that
        # compiles without spills for every head layout (64 rows on 4 warps spilled ~30 KB per thread on
        # sm_90; benchmarks/results/compile_report_sm90.md).
        rows = 16 if flags["INTERPRET"] or fp32 else 64
        BLOCK_Q = max(1, rows // BLOCK_G, triton.cdiv(16, BLOCK_G))
        q_blocks = T // BLOCK_Q + S
        # Short chunks over long contexts (a prefix-cache hit plus a few new tokens, a chunk's tail) would
        # leave most SMs idle walking the whole context: split the keys too, as decode does. A split
        # step is a small one, so its decode sequences ride along in the same kernel (one reduce for all).
        Zp = prefill_splits or splits.prefill_splits(dev, q_blocks * K, meta, BLOCK_N, sliding_window)
    if has_decode and Zp == 1:
        block_n = _FP32_DECODE[0] if fp32 and not flags["INTERPRET"] else BLOCK_N
        # P work programs per kv head: S when the batch fills the SMs (no split); else the device plan shares
        # them among the sequences by their key tiles. `num_splits` forces P = num_splits x S (tests).
        P = S * num_splits if num_splits else splits.decode_programs(dev, S, K, block_n, sliding_window)
        split = P > S
        ends = part_o = part_lse = out  # unused without a split
        if split:
            ends = plan.plan_decode_splits(meta.seq_lens_S, meta.query_start_loc_S1, P, block_n, sliding_window)
            part_o = common.workspace((P, N, BLOCK_HV), torch.float32, dev)
            part_lse = common.workspace((P, N), torch.float32, dev)
        _decode_kernel[(P, K)](
            *common_args, ends, out, part_o, part_lse, sinks, scale, window, v_scale, S, q_TNH.stride(0),
            q_TNH.stride(1), *cache_strides, out.stride(0), out.stride(1), N, H, Hv, G=G, L=L,
            BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_H=BLOCK_H, BLOCK_HV=BLOCK_HV, BLOCK_N=block_n,
            SPLIT=split,
            num_warps=_FP32_DECODE[1] if fp32 else _warps(max(16, triton.next_power_of_2(G)), max(BLOCK_H, BLOCK_HV)),
            **extras, **flags,
        )
        if split:
            _merge_plan_kernel[(S, N)](
                part_o, part_lse, ends, meta.query_start_loc_S1, out, sinks, out.stride(0), out.stride(1), N, Hv,
                BLOCK_Z=16, BLOCK_H=BLOCK_HV, SINKS=extras["SINKS"], INTERPRET=flags["INTERPRET"], num_warps=4,
            )
    if meta.max_query_len > 1:
        part_o = part_lse = out  # unused when Zp == 1
        if Zp > 1:
            part_o = common.workspace((T, N, Zp, BLOCK_HV), torch.float32, dev)
            part_lse = common.workspace((T, N, Zp), torch.float32, dev)
        _prefill_kernel[(q_blocks, K, Zp)](
            *common_args, out, part_o, part_lse, sinks, scale, window, v_scale, S, q_TNH.stride(0), q_TNH.stride(1),
            *cache_strides, out.stride(0), out.stride(1), N, H, Hv, Zp, G=G, L=L, BLOCK_Q=BLOCK_Q, BLOCK_G=BLOCK_G,
            BLOCK_H=BLOCK_H, BLOCK_HV=BLOCK_HV, BLOCK_N=BLOCK_N, SKIP_DECODE=has_decode and Zp == 1, SPLIT=Zp > 1,
            num_warps=8 if fp32 else _warps(BLOCK_Q * BLOCK_G, max(BLOCK_H, BLOCK_HV)), **extras, **flags,
        )
        if Zp > 1:  # every split of every token's row of every head is written (lse -inf where empty): merge all
            _merge_splits_kernel[(T, N)](
                part_o, part_lse, out, sinks, out.stride(0), out.stride(1), N, Hv, Zp,
                BLOCK_Z=triton.next_power_of_2(Zp), BLOCK_H=BLOCK_HV, SINKS=extras["SINKS"],
                INTERPRET=flags["INTERPRET"], num_warps=4,
            )
    return out
