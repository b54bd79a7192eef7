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
(`triton_moe_tiny.run_tiny`, `tiny_up_program`, `tiny_down_program`, `tiny_up_epilogue`, `tiny_down_epilogue`).
TinyConfig's BLOCK_SIZE_K counts values here (a multiple of 32, so a K step holds whole scale groups).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .moe_config import TinyConfig
from .mxfp4 import GROUP
from .triton_moe_tiny import (run_tiny, tiny_columns, tiny_down_epilogue, tiny_down_program, tiny_up_epilogue,
                              tiny_up_program)
from .triton_mxfp4_dequant import e2m1_slots, e8m0_to_fp32, half_f32, word_view


@triton.jit
def _word_dots(q, xs, PAIRS: tl.constexpr = False):
    """Σ over each int32 word's 8 values of value × x: q [..., 4] words, xs the 8 slot tensors x[8w + j]
    (broadcastable to q). Returns fp32 [..., 4] in units of 2**-14 (the slots' fp16 scale). One FMA chain: a
    product and seven fused multiply-adds a word, over the elements 0, 4, 1, 5, 2, 6, 3, 7 in either nibble order
    (PAIRS: mxfp4.to_pair_order's, slot j holding elements (2j, 2j + 1)), so both give the same bits."""
    x0, x1, x2, x3, x4, x5, x6, x7 = xs
    s0, s1, s2, s3 = e2m1_slots(q)
    lo0, hi0 = half_f32(s0, False), half_f32(s0, True)
    lo1, hi1 = half_f32(s1, False), half_f32(s1, True)
    lo2, hi2 = half_f32(s2, False), half_f32(s2, True)
    lo3, hi3 = half_f32(s3, False), half_f32(s3, True)
    # w_j: element j's value. Pair order keeps elements 2j, 2j + 1 in slot j; the checkpoint's order keeps element j
    # in slot j % 4's low (j < 4) or high nibble.
    if PAIRS:
        w0, w1, w2, w3, w4, w5, w6, w7 = lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3
    else:
        w0, w1, w2, w3, w4, w5, w6, w7 = lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3
    t = w0 * x0
    t += w4 * x4
    t += w1 * x1
    t += w5 * x5
    t += w2 * x2
    t += w6 * x6
    t += w3 * x3
    t += w7 * x7
    return t


@triton.jit
def _split8(x):
    """x [..., 2, 2, 2] (a word's 8 values, element 4a + 2b + c at [a, b, c]) -> the 8 elements, in order."""
    c0, c1 = tl.split(x)
    e0_4, e2_6 = tl.split(c0)
    e1_5, e3_7 = tl.split(c1)
    e0, e4 = tl.split(e0_4)
    e2, e6 = tl.split(e2_6)
    e1, e5 = tl.split(e1_5)
    e3, e7 = tl.split(e3_7)
    return e0, e1, e2, e3, e4, e5, e6, e7


@triton.jit(do_not_specialize=["num_pairs"])
def _tiny_mxfp4_up_kernel(x_ptr, wq_ptr, ws_ptr, h_ptr, ids_ptr, map_ptr, b13_ptr, num_pairs, num_ids, inter, hidden,
                          top_k, stride_xt, stride_qe, stride_qn, stride_se, stride_sn, stride_hp, stride_be, alpha,
                          limit, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                          HAS_MAP: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, INTERPRET: tl.constexpr,
                          PAIRS: tl.constexpr = False):
    # Weight tiles are [BN, G, 4] words (G scale groups of 4 words each, one 16-byte vector per group), so a
    # group's scale is one load and one product per word; K steps hold whole groups (BLOCK_K % 32 == 0).
    pair, expert = tiny_up_program(ids_ptr, map_ptr, num_pairs, num_ids, HAS_MAP)
    if expert < 0:
        return
    offs_n, n_ok = tiny_columns(inter, BLOCK_N)
    offs_g = tl.arange(0, BLOCK_K // 32)
    words = offs_g[:, None] * 4 + tl.arange(0, 4)[None, :]  # [G, 4]
    x_ptrs = x_ptr + (pair // top_k).to(tl.int64) * stride_xt + words[:, :, None] * 8 + tl.arange(0, 8)  # [G, 4, 8]
    rows = offs_n.to(tl.int64)
    gq_ptrs = wq_ptr + expert.to(tl.int64) * stride_qe + rows[:, None, None] * stride_qn + words[None, :, :]
    gs_ptrs = ws_ptr + expert.to(tl.int64) * stride_se + rows[:, None] * stride_sn + offs_g[None, :]  # [BN, G]
    uq_ptrs = gq_ptrs + inter * stride_qn
    us_ptrs = gs_ptrs + inter * stride_sn
    acc_g = tl.zeros([BLOCK_N, BLOCK_K // 32, 4], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K // 32, 4], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        if EVEN_K:
            g_ok = offs_g >= 0
        else:
            g_ok = offs_g < (hidden - k0) // 32  # (hidden is a multiple of 32: whole groups)
        ok = n_ok[:, None] & g_ok[None, :]
        # one 8-value vector a word, split in registers into the 8 slot tensors x[8w + j]
        x = tl.load(x_ptrs, mask=g_ok[:, None, None], other=0.0).to(tl.float32)
        x0, x1, x2, x3, x4, x5, x6, x7 = _split8(tl.reshape(x, [BLOCK_K // 32, 4, 2, 2, 2]))
        xs = (x0[None], x1[None], x2[None], x3[None], x4[None], x5[None], x6[None], x7[None])
        qg = tl.load(gq_ptrs, mask=ok[:, :, None], other=0)
        qu = tl.load(uq_ptrs, mask=ok[:, :, None], other=0)
        acc_g += _word_dots(qg, xs, PAIRS) * e8m0_to_fp32(tl.load(gs_ptrs, mask=ok, other=127))[:, :, None]
        acc_u += _word_dots(qu, xs, PAIRS) * e8m0_to_fp32(tl.load(us_ptrs, mask=ok, other=127))[:, :, None]
        x_ptrs += BLOCK_K
        gq_ptrs += BLOCK_K // 8
        uq_ptrs += BLOCK_K // 8
        gs_ptrs += BLOCK_K // 32
        us_ptrs += BLOCK_K // 32
    gate = tl.sum(tl.sum(acc_g, axis=2), axis=1) * 16384.0
    up = tl.sum(tl.sum(acc_u, axis=2), axis=1) * 16384.0
    tiny_up_epilogue(gate, up, pair, expert, offs_n, n_ok, h_ptr, stride_hp, b13_ptr, stride_be, inter, alpha, limit,
                     HAS_BIAS, ACT, INTERPRET)


@triton.jit(do_not_specialize=["num_pairs"])
def _tiny_mxfp4_down_kernel(h_ptr, wq_ptr, ws_ptr, out_ptr, ids_ptr, map_ptr, weights_ptr, b2_ptr, num_pairs, num_ids,
                            hidden, inter, stride_hp, stride_qe, stride_qn, stride_se, stride_sn, stride_ot, stride_be,
                            TOP_K: tl.constexpr, KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            EVEN_K: tl.constexpr, HAS_MAP: tl.constexpr, HAS_BIAS: tl.constexpr,
                            INTERPRET: tl.constexpr, PAIRS: tl.constexpr = False):
    # [KP, BN, G, 4] word tiles: the token's K experts side by side; the pair axis is reduced after the K loop
    # (no cross-thread reduction per step).
    t, offs_n, n_ok, pair_p, expert_p, live_p, w_p = tiny_down_program(ids_ptr, map_ptr, weights_ptr, num_pairs,
                                                                       num_ids, hidden, BLOCK_N, TOP_K, KP, HAS_MAP)
    offs_g = tl.arange(0, BLOCK_K // 32)
    words = offs_g[:, None] * 4 + tl.arange(0, 4)[None, :]  # [G, 4]
    h_ptrs = (h_ptr + pair_p[:, None, None, None].to(tl.int64) * stride_hp + words[None, :, :, None] * 8
              + tl.arange(0, 8))  # [KP, G, 4, 8]
    e = tl.maximum(expert_p, 0).to(tl.int64)
    rows = offs_n.to(tl.int64)
    q_ptrs = (wq_ptr + e[:, None, None, None] * stride_qe + rows[None, :, None, None] * stride_qn
              + words[None, None, :, :])  # [KP, BN, G, 4]
    s_ptrs = ws_ptr + e[:, None, None] * stride_se + rows[None, :, None] * stride_sn + offs_g[None, None, :]
    row_ok = live_p[:, None] & n_ok[None, :]  # [KP, BN]
    w4 = w_p[:, None, None, None]
    acc = tl.zeros([KP, BLOCK_N, BLOCK_K // 32, 4], dtype=tl.float32)  # per pair: summed after the loop
    for i0 in range(0, inter, BLOCK_K):
        if EVEN_K:
            g_ok = offs_g >= 0
        else:
            g_ok = offs_g < (inter - i0) // 32
        hx = tl.load(h_ptrs, mask=(live_p[:, None] & g_ok[None, :])[:, :, None, None], other=0.0).to(tl.float32)
        x0, x1, x2, x3, x4, x5, x6, x7 = _split8(tl.reshape(hx, [KP, BLOCK_K // 32, 4, 2, 2, 2]))
        xs = (x0[:, None], x1[:, None], x2[:, None], x3[:, None], x4[:, None], x5[:, None], x6[:, None], x7[:, None])
        ok = row_ok[:, :, None] & g_ok[None, None, :]  # [KP, BN, G]
        q = tl.load(q_ptrs, mask=ok[:, :, :, None], other=0)
        sc = e8m0_to_fp32(tl.load(s_ptrs, mask=ok, other=127))
        acc += _word_dots(q, xs, PAIRS) * sc[:, :, :, None]
        h_ptrs += BLOCK_K
        q_ptrs += BLOCK_K // 8
        s_ptrs += BLOCK_K // 32
    # the routed weights and the pair sum once at the end (linear: the same sum), in a fixed order
    y = tl.sum(tl.sum(tl.sum(acc * w4, axis=3), axis=2), axis=0) * 16384.0
    tiny_down_epilogue(y, t, expert_p, live_p, w_p, offs_n, n_ok, b2_ptr, stride_be, out_ptr, stride_ot, HAS_BIAS,
                       INTERPRET)


def _weight(q_ENB: torch.Tensor, s_ENS: torch.Tensor, pairs: bool) -> dict:
    s_ENS = s_ENS if s_ENS.stride(-1) == 1 else s_ENS.contiguous()
    return dict(wq_ptr=q_ENB, ws_ptr=s_ENS, stride_qe=q_ENB.stride(0), stride_qn=q_ENB.stride(1),
                stride_se=s_ENS.stride(0), stride_sn=s_ENS.stride(1), PAIRS=pairs)


def tiny_fused_moe_mxfp4(x_TD, w13_blocks_EFSQ, w13_scales_EFS, w2_blocks_EDSQ, w2_scales_EDS, weights_P, ids_P,
                         expert_map_G, b13_EF, b2_ED, act_args: tuple[int, float, float], out: torch.Tensor,
                         tiny: TinyConfig, top_k: int, pairs: bool = False) -> torch.Tensor:
    """The two launches above into `out` [T, D]. Called by `triton_fused_moe_mxfp4` with its inputs checked, x
    row-contiguous and the flat [T*K] routing; `pairs`: the blocks are in mxfp4.to_pair_order's nibble order. No
    host sync."""
    for g in (tiny.up, tiny.down):
        if g.BLOCK_SIZE_K < GROUP:
            raise ValueError(f"TINY BLOCK_SIZE_K={g.BLOCK_SIZE_K} is invalid for MXFP4 weights: must be >= {GROUP} "
                             "(whole scale groups a K step).")
    E, F = w13_blocks_EFSQ.shape[:2]
    return run_tiny(_tiny_mxfp4_up_kernel, _weight(word_view(w13_blocks_EFSQ), w13_scales_EFS, pairs),
                    _tiny_mxfp4_down_kernel, _weight(word_view(w2_blocks_EDSQ), w2_scales_EDS, pairs), x_TD, weights_P,
                    ids_P,
                    expert_map_G, b13_EF, b2_ED, act_args, out, tiny, top_k, E, F // 2)
