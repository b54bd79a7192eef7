"""The MXFP4 fused MoE for tiny batches (decode): the two GEMVs of kernels/triton_moe_tiny.py reading packed
e2m1 bytes and E8M0 scales instead of float rows.

Legend: T tokens, D hidden, E local experts, I expert intermediate size, F = 2I, K top-k, P = T*K pairs,
W int32 words (8 values) of a row, G scale groups (32 values, 4 words).

At decode sizes the sorted MXFP4 path (kernels/triton_moe_mxfp4.py) runs MMA tiles of 16 rows for one real
row and dequantizes each B tile with ~10 integer ops per value; it measured 0.7x bf16 at one token. Here each
selected expert's bytes are read once per pair (17/32 byte per value: a quarter of bf16's, plus the scales),
decoded in registers a word at a time (`e2m1_slots`: ~2 integer ops per value, kernels/triton_mxfp4_dequant.py)
and multiplied on the CUDA cores with fp32 accumulation:
1. Gate-up GEMV, grid (P, I / BLOCK_N): program (p, n) reads the pair's expert from topk_ids (through the
   expert map), the token's x row as 8 strided slot vectors (x[8w + j], matching the word's slots) and the
   [BLOCK_N, BLOCK_K / 8] words of the gate and up rows; per word, Σ_j x·v over its 8 values, times the word's
   scale 2**(s - 127) (one fp32 product per word), accumulated in fp32; × 2**14 once at the end. Biases, the
   activation (gpt-oss's clamped swiglu) and the h row store are the float tiny path's epilogue.
2. Down GEMV + top-k sum, grid (T, D / BLOCK_N): a token's K pairs side by side ([KP, BLOCK_N, BLOCK_K / 8]
   words of the K experts' w2 rows), h scaled by the routed weight, the pair axis summed in registers in a
   fixed order (deterministic, no atomics), + Σ_k w_k · b2[e_k], one store per output row.
Launch, grid narrowing, the remote-expert exits and the epilogues are shared with the float path
(`triton_moe_tiny.run_tiny`, `tiny_up_epilogue`, `tiny_down_epilogue`, `tiny_token_pairs`).
TinyConfig's BLOCK_SIZE_K counts values here (a multiple of 32, so a K step holds whole scale groups).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .moe_align import _local_expert
from .moe_config import TinyConfig
from .mxfp4 import GROUP
from .triton_moe_tiny import run_tiny, tiny_down_epilogue, tiny_token_pairs, tiny_up_epilogue
from .triton_mxfp4_dequant import e2m1_slots, e8m0_to_fp32, half_f32, word_view


@triton.jit
def _word_dots(q, xs):
    """Σ over each int32 word's 8 values of value × x: q [..., W] words, xs the 8 slot tensors x[8w + j]
    (broadcastable to q). Returns fp32 [..., W] in units of 2**-14 (the slots' fp16 scale)."""
    x0, x1, x2, x3, x4, x5, x6, x7 = xs
    s0, s1, s2, s3 = e2m1_slots(q)
    t = half_f32(s0, False) * x0 + half_f32(s0, True) * x4
    t += half_f32(s1, False) * x1 + half_f32(s1, True) * x5
    t += half_f32(s2, False) * x2 + half_f32(s2, True) * x6
    t += half_f32(s3, False) * x3 + half_f32(s3, True) * x7
    return t


@triton.jit
def _slots(ptrs, mask):
    """The 8 slot vectors x[8w + j] (fp32) of the word offsets in `ptrs` (which point at x[8w])."""
    return (tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), tl.load(ptrs + 1, mask=mask, other=0.0).to(tl.float32),
            tl.load(ptrs + 2, mask=mask, other=0.0).to(tl.float32), tl.load(ptrs + 3, mask=mask, other=0.0).to(tl.float32),
            tl.load(ptrs + 4, mask=mask, other=0.0).to(tl.float32), tl.load(ptrs + 5, mask=mask, other=0.0).to(tl.float32),
            tl.load(ptrs + 6, mask=mask, other=0.0).to(tl.float32), tl.load(ptrs + 7, mask=mask, other=0.0).to(tl.float32))


@triton.jit(do_not_specialize=["num_pairs"])
def _tiny_mxfp4_up_kernel(x_ptr, wq_ptr, ws_ptr, h_ptr, ids_ptr, map_ptr, b13_ptr, num_pairs, num_ids, inter, hidden,
                          top_k, stride_xt, stride_qe, stride_qn, stride_se, stride_sn, stride_hp, stride_be, alpha,
                          limit, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                          HAS_MAP: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, INTERPRET: tl.constexpr):
    pair = tl.program_id(0)
    expert = _local_expert(ids_ptr, map_ptr, pair, num_pairs, num_ids, HAS_MAP)
    if expert < 0:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < inter
    offs_w = tl.arange(0, BLOCK_K // 8)
    x_ptrs = x_ptr + (pair // top_k).to(tl.int64) * stride_xt + offs_w * 8
    rows = offs_n[:, None].to(tl.int64)
    gq_ptrs = wq_ptr + expert.to(tl.int64) * stride_qe + rows * stride_qn + offs_w[None, :]  # [BN, BW] words
    gs_ptrs = ws_ptr + expert.to(tl.int64) * stride_se + rows * stride_sn + (offs_w // 4)[None, :]  # each word's scale
    uq_ptrs = gq_ptrs + inter * stride_qn
    us_ptrs = gs_ptrs + inter * stride_sn
    acc_g = tl.zeros([BLOCK_N, BLOCK_K // 8], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K // 8], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        if EVEN_K:
            w_ok = offs_w >= 0
        else:
            w_ok = offs_w < (hidden - k0) // 8  # (hidden is a multiple of 32: whole words and groups)
        ok = n_ok[:, None] & w_ok[None, :]
        xs = _slots(x_ptrs, w_ok)
        qg = tl.load(gq_ptrs, mask=ok, other=0)
        qu = tl.load(uq_ptrs, mask=ok, other=0)
        acc_g += _word_dots(qg, xs) * e8m0_to_fp32(tl.load(gs_ptrs, mask=ok, other=127))
        acc_u += _word_dots(qu, xs) * e8m0_to_fp32(tl.load(us_ptrs, mask=ok, other=127))
        x_ptrs += BLOCK_K
        gq_ptrs += BLOCK_K // 8
        uq_ptrs += BLOCK_K // 8
        gs_ptrs += BLOCK_K // GROUP
        us_ptrs += BLOCK_K // GROUP
    tiny_up_epilogue(tl.sum(acc_g, axis=1) * 16384.0, tl.sum(acc_u, axis=1) * 16384.0, pair, expert, offs_n, n_ok,
                     h_ptr, stride_hp, b13_ptr, stride_be, inter, alpha, limit, HAS_BIAS, ACT, INTERPRET)


@triton.jit(do_not_specialize=["num_pairs"])
def _tiny_mxfp4_down_kernel(h_ptr, wq_ptr, ws_ptr, out_ptr, ids_ptr, map_ptr, weights_ptr, b2_ptr, num_pairs, num_ids,
                            hidden, inter, stride_hp, stride_qe, stride_qn, stride_se, stride_sn, stride_ot, stride_be,
                            TOP_K: tl.constexpr, KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            EVEN_K: tl.constexpr, HAS_MAP: tl.constexpr, HAS_BIAS: tl.constexpr,
                            INTERPRET: tl.constexpr):
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    offs_w = tl.arange(0, BLOCK_K // 8)
    pair_p, expert_p, live_p, w_p = tiny_token_pairs(t, ids_ptr, map_ptr, weights_ptr, num_pairs, num_ids, TOP_K, KP,
                                                     HAS_MAP)
    h_ptrs = h_ptr + pair_p[:, None].to(tl.int64) * stride_hp + offs_w[None, :] * 8  # [KP, BW]: x[8w] of each pair
    e3 = tl.maximum(expert_p, 0).to(tl.int64)[:, None, None]
    rows = offs_n[None, :, None].to(tl.int64)
    q_ptrs = wq_ptr + e3 * stride_qe + rows * stride_qn + offs_w[None, None, :]  # [KP, BN, BW] words
    s_ptrs = ws_ptr + e3 * stride_se + rows * stride_sn + (offs_w // 4)[None, None, :]
    row_ok = live_p[:, None, None] & n_ok[None, :, None]
    acc = tl.zeros([BLOCK_N, BLOCK_K // 8], dtype=tl.float32)
    for i0 in range(0, inter, BLOCK_K):
        if EVEN_K:
            w_ok = offs_w >= 0
        else:
            w_ok = offs_w < (inter - i0) // 8
        a_ok = live_p[:, None] & w_ok[None, :]
        x0, x1, x2, x3, x4, x5, x6, x7 = _slots(h_ptrs, a_ok)
        # the routed weight scales h (linear, so the same sum); [KP, 1, BW] against [KP, BN, BW] words
        w3 = w_p[:, None, None]
        xs = (x0[:, None, :] * w3, x1[:, None, :] * w3, x2[:, None, :] * w3, x3[:, None, :] * w3,
              x4[:, None, :] * w3, x5[:, None, :] * w3, x6[:, None, :] * w3, x7[:, None, :] * w3)
        ok = row_ok & w_ok[None, None, :]
        q = tl.load(q_ptrs, mask=ok, other=0)
        sc = e8m0_to_fp32(tl.load(s_ptrs, mask=ok, other=127))
        acc += tl.sum(_word_dots(q, xs) * sc, axis=0)
        h_ptrs += BLOCK_K
        q_ptrs += BLOCK_K // 8
        s_ptrs += BLOCK_K // GROUP
    tiny_down_epilogue(tl.sum(acc, axis=1) * 16384.0, t, expert_p, live_p, w_p, offs_n, n_ok, b2_ptr, stride_be,
                       out_ptr, stride_ot, HAS_BIAS, INTERPRET)


def _weight(q_ENB: torch.Tensor, s_ENS: torch.Tensor) -> dict:
    s_ENS = s_ENS if s_ENS.stride(-1) == 1 else s_ENS.contiguous()
    return dict(wq_ptr=q_ENB, ws_ptr=s_ENS, stride_qe=q_ENB.stride(0), stride_qn=q_ENB.stride(1),
                stride_se=s_ENS.stride(0), stride_sn=s_ENS.stride(1))


def tiny_fused_moe_mxfp4(x_TD, w13_blocks_EFSQ, w13_scales_EFS, w2_blocks_EDSQ, w2_scales_EDS, weights_P, ids_P,
                         expert_map_G, b13_EF, b2_ED, act_args: tuple[int, float, float], out: torch.Tensor,
                         tiny: TinyConfig, top_k: int) -> torch.Tensor:
    """The two launches above into `out` [T, D]. Called by `triton_fused_moe_mxfp4` with its inputs checked, x
    row-contiguous and the flat [T*K] routing; no host sync."""
    for g in (tiny.up, tiny.down):
        if g.BLOCK_SIZE_K < GROUP:
            raise ValueError(f"TINY BLOCK_SIZE_K={g.BLOCK_SIZE_K} is invalid for MXFP4 weights: must be >= {GROUP} "
                             "(whole scale groups a K step).")
    E, F = w13_blocks_EFSQ.shape[:2]
    return run_tiny(_tiny_mxfp4_up_kernel, _weight(word_view(w13_blocks_EFSQ), w13_scales_EFS),
                    _tiny_mxfp4_down_kernel, _weight(word_view(w2_blocks_EDSQ), w2_scales_EDS), x_TD, weights_P, ids_P,
                    expert_map_G, b13_EF, b2_ED, act_args, out, tiny, top_k, E, F // 2)
