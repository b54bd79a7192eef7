"""Sparse MLA in Triton (DeepSeek Sparse Attention): absorbed MLA where each query token reads only the latent rows
of the positions its indexer selected. Same contract as dsa.reference_sparse_mla_attention (legend there and in
mla.py: T, N, C, P, R, K, L).

One kernel for decode tokens and prefill chunks alike, as triton_mla.py's dense one: grid (T, N / BLOCK_H, Z), a
program takes BLOCK_H heads of one token and walks its selected positions in BLOCK_N tiles: the positions (one int32
each), their blocks from the sequence's table, then one [BLOCK_N, C] latent tile and its [BLOCK_N, P] rope tile,
which feed BLOCK_H heads as keys and as values (MLA decode is multi-query attention), online softmax in exp2. A token
at position p has min(K, p + 1) positions, selected ones first (the selection's contract), so the walk ends there and
every tile it walks holds one at least; the rest of the tile is masked.

Splits: Z equal slices of the K position slots per (token, head block) when the tokens alone leave SMs idle (a small
decode batch), merged by triton_mla's merge kernel. Z comes from T, the head blocks and K only, so a decode graph
captured at batch b replays with any lengths. An fp8 latent cache is widened in registers (no workspace: each token
reads rows of its own), its scale folded into the softmax scale and the output.

Bytes read per token and layer: K rows of C + P values (plus K positions and their table entries), whatever the
context: 2048 x 656 B = 1.3 MB in fp8 for DeepSeek-V3.2, where dense MLA reads the whole context.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .attention import AttentionMetadata
from .mla import FP8_CACHE_DTYPES, check_mla_inputs, check_sinks
from .split_planning import pick_splits
from .triton_common import causal_len, seq_of_token
from .triton_mla import _LOG2E, _launch_config, _mla_attend, _mla_merge_kernel, _mla_store


@triton.jit(do_not_specialize=["num_seqs", "Z"])
def _sparse_mla_kernel(ql_ptr, qpe_ptr, cache_ptr, tables_ptr, seq_lens_ptr, qsl_ptr, topk_ptr, out_ptr, part_o_ptr,
                       part_lse_ptr, sinks_ptr, scale_log2, kv_scale, num_seqs, stride_qlt, stride_qln, stride_qpt, stride_qpn,
                       stride_cb, stride_cl, stride_tb, stride_kt, stride_ot, stride_on, num_heads, C, P, K, Z,
                       L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                       BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr,
                       SINKS: tl.constexpr = False):
    tok = tl.program_id(0)
    hb = tl.program_id(1)
    zsplit = tl.program_id(2)
    s_idx = seq_of_token(qsl_ptr, num_seqs, tok)
    if s_idx >= num_seqs:
        return
    count = tl.minimum(causal_len(qsl_ptr, seq_lens_ptr, s_idx, tok), K)  # its selected positions, first in its row
    per_split = tl.cdiv(tl.cdiv(K, Z), BLOCK_N) * BLOCK_N
    start = zsplit * per_split
    end = tl.minimum(start + per_split, count)

    tok64 = tok.to(tl.int64)
    h, h_ok, c, c_ok, m_i, l_i, acc = _mla_attend(
        ql_ptr, qpe_ptr, cache_ptr, tables_ptr, s_idx, topk_ptr, tok64, hb, start, end, scale_log2, stride_qlt,
        stride_qln, stride_qpt, stride_qpn, stride_cb, stride_cl, stride_tb, stride_kt, num_heads, C, P, L, BLOCK_H,
        BLOCK_C, BLOCK_P, BLOCK_N, True, INTERPRET, PREC)
    # (split 0 holds the first selected position, so it is never empty; a later one past the count stores -inf)
    _mla_store(out_ptr, part_o_ptr, part_lse_ptr, tok64, tok64, zsplit, h, h_ok, c, c_ok, m_i, l_i, acc, kv_scale,
               stride_ot, stride_on, num_heads, Z, sinks_ptr, BLOCK_C, SPLIT, INTERPRET, SINKS)


# An fp8 latent cache on sm_90 (Triton 3.6, DeepSeek-V3.2 shapes; `compile_report --only dsa`): the dense kernel's
# fp8 configs (16 heads x 32 rows, 8 warps) get 128 registers from ptxas and spill 4-8 B here; 32 x 32 compiles to 221
# registers unsplit (half the latent re-reads of 16 heads) and 16 x 64 to 187 split, both without spills. Float caches
# take the dense kernel's configs (231 / 210 registers, no spills).
_FP8_CONFIG = (32, 32, 8, 2)
_FP8_SPLIT_CONFIG = (16, 64, 8, 2)


def _config(dt: torch.dtype, interp: bool, num_heads: int, split: bool, fp8: bool) -> tuple[int, int, int, int]:
    if not fp8 or interp or dt == torch.float32:
        return _launch_config(dt, interp, num_heads, split=split, fp8_cache=fp8)
    block_h, block_n, warps, stages = _FP8_SPLIT_CONFIG if split else _FP8_CONFIG
    return min(block_h, max(16, triton.next_power_of_2(num_heads))), block_n, warps, stages


def triton_sparse_mla_attention(q_latent_TNC: torch.Tensor, q_pe_TNP: torch.Tensor, latent_cache_BLR: torch.Tensor,
                                meta: AttentionMetadata, topk_TK: torch.Tensor, scale: float, kv_scale: float = 1.0, *,
                                sinks_N: torch.Tensor | None = None, num_splits: int | None = None) -> torch.Tensor:
    """Same contract as `reference_sparse_mla_attention` (sinks_N too): out_latent_TNC [T, N, C] in q's dtype. topk_TK: each row's
    selected positions first (min(K, position + 1) of them, any order), then -1. No host sync. `num_splits` forces Z
    (tests)."""
    common.check_dtype("q_latent_TNC", q_latent_TNC)
    check_mla_inputs(q_latent_TNC, q_pe_TNP, latent_cache_BLR)
    T, N, C = q_latent_TNC.shape
    P = q_pe_TNP.shape[2]
    check_sinks(sinks_N, N)
    if topk_TK.dim() != 2 or topk_TK.shape[0] != T or topk_TK.dtype != torch.int32:
        raise ValueError(f"topk_TK {tuple(topk_TK.shape)} {topk_TK.dtype} is invalid: must be int32 [{T}, index_topk].")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits={num_splits} is invalid: must be >= 1 (or None to pick).")
    dev, dt = q_latent_TNC.device, q_latent_TNC.dtype
    out = common.workspace((T, N, C), dt, dev)
    if T == 0:
        return out
    K = topk_TK.shape[1]
    q_latent_TNC = q_latent_TNC if q_latent_TNC.stride(-1) == 1 else q_latent_TNC.contiguous()
    q_pe_TNP = q_pe_TNP if q_pe_TNP.stride(-1) == 1 else q_pe_TNP.contiguous()
    topk_TK = topk_TK if topk_TK.stride(-1) == 1 else topk_TK.contiguous()
    interp = common.interpreting(q_latent_TNC)
    fp8 = latent_cache_BLR.dtype in FP8_CACHE_DTYPES
    BLOCK_C = max(16, triton.next_power_of_2(C))
    cfg = _config(dt, interp, N, False, fp8)
    Z = num_splits or pick_splits(dev, T * triton.cdiv(N, cfg[0]), K, cfg[1])
    if Z > 1:
        cfg = _config(dt, interp, N, True, fp8)
    block_h, block_n, warps, stages = cfg
    part_o = part_lse = out
    if Z > 1:
        part_o = common.workspace((T, N, Z, BLOCK_C), torch.float32, dev)
        part_lse = common.workspace((T, N, Z), torch.float32, dev)
    head_blocks = triton.cdiv(N, block_h)
    sinks = sinks_N if sinks_N is not None else out  # a placeholder pointer when there are none (never read)
    _sparse_mla_kernel[(T, head_blocks, Z)](
        q_latent_TNC, q_pe_TNP, latent_cache_BLR, meta.block_tables_SM, meta.seq_lens_S, meta.query_start_loc_S1,
        topk_TK, out, part_o, part_lse, sinks, scale * kv_scale * _LOG2E, kv_scale, meta.num_seqs, q_latent_TNC.stride(0),
        q_latent_TNC.stride(1), q_pe_TNP.stride(0), q_pe_TNP.stride(1), latent_cache_BLR.stride(0),
        latent_cache_BLR.stride(1), meta.block_tables_SM.stride(0), topk_TK.stride(0), out.stride(0), out.stride(1), N,
        C, P, K, Z, L=latent_cache_BLR.shape[1], BLOCK_H=block_h, BLOCK_C=BLOCK_C,
        BLOCK_P=max(16, triton.next_power_of_2(P)), BLOCK_N=block_n, SPLIT=Z > 1, INTERPRET=interp,
        PREC=common.dot_precision(dt), SINKS=sinks_N is not None, num_warps=warps, num_stages=stages)
    if Z > 1:
        _mla_merge_kernel[(T, head_blocks)](
            part_o, part_lse, out, out.stride(0), out.stride(1), N, C, Z, sinks, BLOCK_H=block_h,
            BLOCK_Z=triton.next_power_of_2(Z), BLOCK_C=BLOCK_C, INTERPRET=interp, SINKS=sinks_N is not None,
            num_warps=8)
    return out


__all__ = ["triton_sparse_mla_attention"]
