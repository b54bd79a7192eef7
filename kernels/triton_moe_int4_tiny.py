"""The INT4 fused MoE for tiny batches (decode): the two GEMVs of kernels/triton_moe_tiny.py reading packed int4
words with their groups' scales (and zero points) instead of float rows.

Legend: T tokens, D hidden, E local experts, I expert intermediate size, F = 2I, K top-k, P = T*K pairs, W int32
words (8 values) of a row; GROUP values share a scale (and a zero point).

Each selected expert's words are read once per pair (half a byte a value, a quarter of bf16's, plus one scale per
GROUP values: 2/32 byte at Kimi's group 32 in bf16), decoded in registers a word at a time (`int4_slots`: the
magic-number decode, ~2 integer ops a value, kernels/triton_int4_dequant.py), and multiplied on the CUDA cores with
fp32 accumulation:
1. Gate-up GEMV, grid (P, I / BLOCK_N): program (p, n) reads the pair's expert from topk_ids (through the expert
   map), the token's x row as 8 strided slot vectors (x[8w + j], matching the word's slots) and the [BLOCK_N,
   BLOCK_K / 8] words of the gate and up rows; per word, Σ_j x_j (u_j - z) over its 8 values (each (u - z) an exact
   small integer in fp32), times the word's group scale, accumulated in fp32. The activation and the h row store
   are the float tiny path's epilogue.
2. Down GEMV + top-k sum, grid (T, D / BLOCK_N): a token's K pairs side by side ([KP, BLOCK_N, BLOCK_K / 8] words of
   the K experts' w2 rows), h scaled by the routed weight, the pair axis summed in registers in a fixed order
   (deterministic, no atomics), one store per output row.
Launch, grid narrowing, the remote-expert exits and the epilogues are shared with the float path
(`triton_moe_tiny.run_tiny`, `tiny_up_program`, `tiny_down_program`, `tiny_up_epilogue`, `tiny_down_epilogue`).
A word's scale and zero point are loaded at its group's address ([BLOCK_N, BLOCK_K / 8]: the GROUP / 8 words of a group hit the same bytes).
TinyConfig's BLOCK_SIZE_K counts values here (a multiple of 8).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .moe_config import TinyConfig
from .triton_int4_dequant import group_of_words, int4_slots
from .triton_moe_mxfp4_tiny import _split8
from .triton_moe_packed import gate_up_ptrs
from .triton_moe_tiny import (run_tiny, tiny_columns, tiny_down_epilogue, tiny_down_program, tiny_up_epilogue,
                              tiny_up_program)
from .triton_mxfp4_dequant import half_f32


@triton.jit
def _word_dots(q, xs, c):
    """Σ over each int32 word's 8 values of (u - z) × x: q [..., W] words, xs the 8 slot tensors x[8w + j]
    (broadcastable to q), c = 1024 + z (fp32, q's shape). Each half is 1024 + u exactly, so half - c is exact."""
    x0, x1, x2, x3, x4, x5, x6, x7 = xs
    s0, s1, s2, s3 = int4_slots(q)
    t = (half_f32(s0, False) - c) * x0
    t += (half_f32(s0, True) - c) * x4
    t += (half_f32(s1, False) - c) * x1
    t += (half_f32(s1, True) - c) * x5
    t += (half_f32(s2, False) - c) * x2
    t += (half_f32(s2, True) - c) * x6
    t += (half_f32(s3, False) - c) * x3
    t += (half_f32(s3, True) - c) * x7
    return t


@triton.jit
def _zeros_c(z_ptrs, mask, HAS_ZP: tl.constexpr, shape: tl.constexpr):
    """1024 + z for each word: the loaded zero points, or 1032 (z = 8) when symmetric."""
    if HAS_ZP:
        c = tl.load(z_ptrs, mask=mask, other=8).to(tl.float32) + 1024.0
    else:
        c = tl.full(shape, 1032.0, tl.float32)
    return c


@triton.jit(do_not_specialize=["num_pairs"])
def _tiny_int4_up_kernel(x_ptr, wq_ptr, ws_ptr, wz_ptr, h_ptr, ids_ptr, map_ptr, b13_ptr, num_pairs, num_ids, inter,
                         hidden, top_k, stride_xt, stride_qe, stride_qn, stride_se, stride_sn, stride_hp, stride_be,
                         alpha, limit, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                         HAS_MAP: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, INTERPRET: tl.constexpr,
                         GROUP: tl.constexpr, HAS_ZP: tl.constexpr):
    pair, expert = tiny_up_program(ids_ptr, map_ptr, num_pairs, num_ids, HAS_MAP)
    if expert < 0:
        return
    offs_n, n_ok = tiny_columns(inter, BLOCK_N)
    BW: tl.constexpr = BLOCK_K // 8
    offs_w = tl.arange(0, BW)
    x_ptrs = x_ptr + (pair // top_k).to(tl.int64) * stride_xt + offs_w[:, None] * 8 + tl.arange(0, 8)[None, :]
    # [BN, BW] word tiles and their rows' first group, gate's then up's (as the sorted path's K loop starts)
    gq_ptrs, gs_ptrs, gz_ptrs, uq_ptrs, us_ptrs, uz_ptrs = gate_up_ptrs(
        (wq_ptr, ws_ptr, wz_ptr, ws_ptr, stride_qe, stride_qn, stride_se, stride_sn, 1, 0), expert, offs_n, inter,
        BLOCK_K, (None, None, 8, 0, False))
    acc_g = tl.zeros([BLOCK_N, BW], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BW], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        if EVEN_K:
            w_ok = offs_w >= 0
        else:
            w_ok = offs_w < (hidden - k0) // 8  # (hidden is a multiple of GROUP: whole words)
        ok = n_ok[:, None] & w_ok[None, :]
        x = tl.load(x_ptrs, mask=w_ok[:, None], other=0.0).to(tl.float32)
        x0, x1, x2, x3, x4, x5, x6, x7 = _split8(tl.reshape(x, [BW, 2, 2, 2]))
        xs = (x0[None], x1[None], x2[None], x3[None], x4[None], x5[None], x6[None], x7[None])
        g = group_of_words(k0, BLOCK_K, GROUP)[None, :]
        qg = tl.load(gq_ptrs, mask=ok, other=0)
        qu = tl.load(uq_ptrs, mask=ok, other=0)
        cg = _zeros_c(gz_ptrs + g, ok, HAS_ZP, [BLOCK_N, BW])
        cu = _zeros_c(uz_ptrs + g, ok, HAS_ZP, [BLOCK_N, BW])
        acc_g += _word_dots(qg, xs, cg) * tl.load(gs_ptrs + g, mask=ok, other=0.0).to(tl.float32)
        acc_u += _word_dots(qu, xs, cu) * tl.load(us_ptrs + g, mask=ok, other=0.0).to(tl.float32)
        x_ptrs += BLOCK_K
        gq_ptrs += BW
        uq_ptrs += BW
    tiny_up_epilogue(tl.sum(acc_g, axis=1), tl.sum(acc_u, axis=1), pair, expert, offs_n, n_ok, h_ptr, stride_hp,
                     b13_ptr, stride_be, inter, alpha, limit, HAS_BIAS, ACT, INTERPRET)


@triton.jit(do_not_specialize=["num_pairs"])
def _tiny_int4_down_kernel(h_ptr, wq_ptr, ws_ptr, wz_ptr, out_ptr, ids_ptr, map_ptr, weights_ptr, b2_ptr, num_pairs,
                           num_ids, hidden, inter, stride_hp, stride_qe, stride_qn, stride_se, stride_sn, stride_ot,
                           stride_be, TOP_K: tl.constexpr, KP: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, HAS_MAP: tl.constexpr, HAS_BIAS: tl.constexpr,
                           INTERPRET: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr):
    # [KP, BN, BW] word tiles: the token's K experts side by side; the pair axis is reduced after the K loop.
    BW: tl.constexpr = BLOCK_K // 8
    t, offs_n, n_ok, pair_p, expert_p, live_p, w_p = tiny_down_program(ids_ptr, map_ptr, weights_ptr, num_pairs,
                                                                       num_ids, hidden, BLOCK_N, TOP_K, KP, HAS_MAP)
    offs_w = tl.arange(0, BW)
    h_ptrs = (h_ptr + pair_p[:, None, None].to(tl.int64) * stride_hp + offs_w[None, :, None] * 8
              + tl.arange(0, 8)[None, None, :])  # [KP, BW, 8]
    e = tl.maximum(expert_p, 0).to(tl.int64)
    rows = offs_n.to(tl.int64)
    q_ptrs = wq_ptr + e[:, None, None] * stride_qe + rows[None, :, None] * stride_qn + offs_w[None, None, :]
    s_ptrs = ws_ptr + e[:, None, None] * stride_se + rows[None, :, None] * stride_sn  # [KP, BN, 1]
    z_ptrs = wz_ptr + e[:, None, None] * stride_se + rows[None, :, None] * stride_sn
    row_ok = live_p[:, None] & n_ok[None, :]  # [KP, BN]
    acc = tl.zeros([KP, BLOCK_N, BW], dtype=tl.float32)  # per pair: summed after the loop
    for i0 in range(0, inter, BLOCK_K):
        if EVEN_K:
            w_ok = offs_w >= 0
        else:
            w_ok = offs_w < (inter - i0) // 8
        hx = tl.load(h_ptrs, mask=(live_p[:, None] & w_ok[None, :])[:, :, None], other=0.0).to(tl.float32)
        x0, x1, x2, x3, x4, x5, x6, x7 = _split8(tl.reshape(hx, [KP, BW, 2, 2, 2]))
        xs = (x0[:, None], x1[:, None], x2[:, None], x3[:, None], x4[:, None], x5[:, None], x6[:, None], x7[:, None])
        ok = row_ok[:, :, None] & w_ok[None, None, :]  # [KP, BN, BW]
        g = group_of_words(i0, BLOCK_K, GROUP)[None, None, :]
        q = tl.load(q_ptrs, mask=ok, other=0)
        c = _zeros_c(z_ptrs + g, ok, HAS_ZP, [KP, BLOCK_N, BW])
        acc += _word_dots(q, xs, c) * tl.load(s_ptrs + g, mask=ok, other=0.0).to(tl.float32)
        h_ptrs += BLOCK_K
        q_ptrs += BW
    # the routed weights and the pair sum once at the end (linear: the same sum), in a fixed order
    y = tl.sum(tl.sum(acc * w_p[:, None, None], axis=2), axis=0)
    tiny_down_epilogue(y, t, expert_p, live_p, w_p, offs_n, n_ok, b2_ptr, stride_be, out_ptr, stride_ot, HAS_BIAS,
                       INTERPRET)


def _weight(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, group: int) -> dict:
    return dict(wq_ptr=q, ws_ptr=s, wz_ptr=s if z is None else z, stride_qe=q.stride(0), stride_qn=q.stride(1),
                stride_se=s.stride(0), stride_sn=s.stride(1), GROUP=group, HAS_ZP=z is not None)


def tiny_fused_moe_int4(x_TD, w13_q, w13_s, w13_z, w2_q, w2_s, w2_z, group: int, weights_P, ids_P, expert_map_G,
                        b13_EF, b2_ED, act_args: tuple[int, float, float], out: torch.Tensor, tiny: TinyConfig,
                        top_k: int) -> torch.Tensor:
    """The two launches above into `out` [T, D]. Called by `triton_fused_moe_int4` with its inputs checked and
    contiguous, x row-contiguous and the flat [T*K] routing; no host sync."""
    for gemv in (tiny.up, tiny.down):
        if gemv.BLOCK_SIZE_K < 8:
            raise ValueError(f"TINY BLOCK_SIZE_K={gemv.BLOCK_SIZE_K} is invalid for INT4 weights: must be >= 8 (whole "
                             "int32 words a K step).")
    E, F = w13_q.shape[:2]
    return run_tiny(_tiny_int4_up_kernel, _weight(w13_q, w13_s, w13_z, group), _tiny_int4_down_kernel,
                    _weight(w2_q, w2_s, w2_z, group), x_TD, weights_P, ids_P, expert_map_G, b13_EF, b2_ED, act_args,
                    out, tiny, top_k, E, F // 2)
