"""The FP8 block-scaled fused MoE for tiny batches (decode): the float tiny path's two GEMVs
(kernels/triton_moe_tiny.py) reading e4m3 expert weights, W8A8 as fp8.reference_fused_moe_fp8 computes it.

Legend: T tokens, D hidden, E local experts, I expert intermediate size, U the up rows' first row (fp8.up_row), K
top-k, P = T*K pairs, Gd = ceil(D / Bk), Gi = ceil(I / Bk), Bn x Bk the weight block (128 x 128 published).

Four launches, no alignment and no sum pass (the sorted FP8 path at one token is five, with the sum):
1. x quantized per token and Bk group (triton_fp8.triton_per_token_group_quant): xq [T, D] e4m3, xs [T, Gd].
2. Gate-up GEMV, grid (P, I / BLOCK_N): each tile's products are one FMA a value, the e4m3 weight times x's value
   already scaled by its group's xs and by the weight block's scale (a [BN, BK] gather of [E, F/Bn, D/Bk] scales:
   L1-resident, a row of scales serves Bn x Bk weights); act(gate) * up in fp32 into h_PI (fp32: the reference
   quantizes the fp32 activation, not a rounded one).
3. h quantized per pair and Bk group (the same kernel as 1): hq [P, I], hs [P, Gi].
4. Down GEMV + top-k sum, grid (T, D / BLOCK_N), the float path's walk (pairs in order into one fp32 tile, each
   scaled by its routed weight): deterministic, no atomics.
K is walked in unrolled tiles (static_range): Triton does not pipeline loads that feed no dot, and unrolled tiles
let ptxas issue them back to back (the float GEMVs' compile_report_tiny). BLOCK_K should span the warps' 16-byte
lanes (512 e4m3 values a warp) so x's (h's) row shares the weight tile's layout.
Choice: `path="tiny"` of triton_fused_moe_fp8, or a TINY entry of the FP8 launch config (T*K <= max_pairs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .moe_align import _local_expert
from .moe_config import TinyConfig, TinyGemm
from .triton_common import activation_epilogue
from .triton_fp8 import triton_per_token_group_quant
from .triton_moe_tiny import num_sms, tiny_columns, tiny_down_epilogue, tiny_down_program, tiny_up_program

# The e4m3 GEMVs' blocks (1-byte weights: 512 values span a warp's lanes): gate-up 2 rows x 1024 at 2 warps, down
# 2 rows x 512 at one warp; BLOCK_K is clamped to the dimension's power of two, BLOCK_N narrowed as the float one.
DEFAULT_TINY_FP8 = TinyConfig(64, TinyGemm(2, 1024, 2, 1), TinyGemm(2, 512, 1, 1))


@triton.jit(do_not_specialize=["num_pairs"])
def _tiny_fp8_up_kernel(xq_ptr, xs_ptr, w_ptr, ws_ptr, h_ptr, ids_ptr, map_ptr, num_pairs, num_ids, inter, hidden,
                        top_k, up_row, stride_xt, stride_xst, stride_we, stride_wf, stride_wse, stride_wsf, stride_hp,
                        alpha, limit, SCALE_N: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, K_TILES: tl.constexpr, HAS_MAP: tl.constexpr, ACT: tl.constexpr):
    pair, expert = tiny_up_program(ids_ptr, map_ptr, num_pairs, num_ids, HAS_MAP)
    if expert < 0:
        return
    offs_n, n_ok = tiny_columns(inter, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)[None, :]
    t = (pair // top_k).to(tl.int64)
    e64 = expert.to(tl.int64)
    g_rows = offs_n[:, None].to(tl.int64)
    u_rows = g_rows + up_row
    w_base = w_ptr + e64 * stride_we
    s_base = ws_ptr + e64 * stride_wse
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for kt in tl.static_range(K_TILES):
        k = kt * BLOCK_K + offs_k
        k_ok = k < hidden
        grp = k // GROUP
        a = (tl.load(xq_ptr + t * stride_xt + k, mask=k_ok, other=0.0).to(tl.float32)
             * tl.load(xs_ptr + t * stride_xst + grp, mask=k_ok, other=0.0))
        ok = n_ok[:, None] & k_ok
        bg = tl.load(w_base + g_rows * stride_wf + k, mask=ok, other=0.0).to(tl.float32)
        bu = tl.load(w_base + u_rows * stride_wf + k, mask=ok, other=0.0).to(tl.float32)
        sg = tl.load(s_base + (g_rows // SCALE_N) * stride_wsf + grp, mask=ok, other=0.0)
        su = tl.load(s_base + (u_rows // SCALE_N) * stride_wsf + grp, mask=ok, other=0.0)
        acc_g += bg * sg * a
        acc_u += bu * su * a
    h = activation_epilogue(tl.sum(acc_g, axis=1), tl.sum(acc_u, axis=1), alpha, limit, ACT)
    tl.store(h_ptr + pair.to(tl.int64) * stride_hp + offs_n, h, mask=n_ok)


@triton.jit(do_not_specialize=["num_pairs"])
def _tiny_fp8_down_kernel(hq_ptr, hs_ptr, w_ptr, ws_ptr, out_ptr, ids_ptr, map_ptr, weights_ptr, num_pairs, num_ids,
                          hidden, inter, stride_hp, stride_hsp, stride_we, stride_wd, stride_wse, stride_wsd, stride_ot,
                          SCALE_N: tl.constexpr, GROUP: tl.constexpr, TOP_K: tl.constexpr, KP: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr, HAS_MAP: tl.constexpr,
                          INTERPRET: tl.constexpr):
    t, offs_n, n_ok, pair_p, expert_p, live_p, w_p = tiny_down_program(ids_ptr, map_ptr, weights_ptr, num_pairs,
                                                                       num_ids, hidden, BLOCK_N, TOP_K, KP, HAS_MAP)
    offs_k = tl.arange(0, BLOCK_K)[None, :]
    rows = offs_n[:, None].to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = t * TOP_K + j
        expert = _local_expert(ids_ptr, map_ptr, pair, num_pairs, num_ids, HAS_MAP)
        w = tl.load(weights_ptr + pair, mask=expert >= 0, other=0.0).to(tl.float32)
        live = (tl.zeros([1, BLOCK_K], dtype=tl.int32) + expert) >= 0  # (a tile mask: see triton_moe_tiny)
        e64 = tl.maximum(expert, 0).to(tl.int64)
        for kt in tl.static_range(K_TILES):
            k = kt * BLOCK_K + offs_k
            k_ok = live & (k < inter)
            grp = k // GROUP
            a = (tl.load(hq_ptr + pair.to(tl.int64) * stride_hp + k, mask=k_ok, other=0.0).to(tl.float32)
                 * tl.load(hs_ptr + pair.to(tl.int64) * stride_hsp + grp, mask=k_ok, other=0.0) * w)
            ok = n_ok[:, None] & k_ok
            b = tl.load(w_ptr + e64 * stride_we + rows * stride_wd + k, mask=ok, other=0.0).to(tl.float32)
            s = tl.load(ws_ptr + e64 * stride_wse + (rows // SCALE_N) * stride_wsd + grp, mask=ok, other=0.0)
            acc += b * s * a
    tiny_down_epilogue(tl.sum(acc, axis=1), t, expert_p, live_p, w_p, offs_n, n_ok, weights_ptr, 0, out_ptr,
                       stride_ot, False, INTERPRET)


def _tiles(block_k: int, dim: int) -> tuple[int, int]:
    bk = min(block_k, triton.next_power_of_2(dim))
    return bk, triton.cdiv(dim, bk)


def tiny_fused_moe_fp8(x_TD, w13q_EFD, w13s, w2q_EDI, w2s, weights_P, ids_P, expert_map_G, block: tuple[int, int],
                       up_row: int, act_args: tuple[int, float, float], out: torch.Tensor, tiny: TinyConfig,
                       top_k: int) -> torch.Tensor:
    """The four launches above into `out` [T, D]; inputs checked and contiguous (triton_fused_moe_fp8). No host
    sync: grids from shapes only."""
    from .triton_moe_tiny import gemv_block_n

    T, D = x_TD.shape
    E, I, P = w13q_EFD.shape[0], w2q_EDI.shape[2], ids_P.numel()
    bn_s, group = block
    has_map = expert_map_G is not None
    map_G = expert_map_G if has_map else ids_P
    num_ids = expert_map_G.numel() if has_map else E
    act, alpha, limit = act_args
    xq, xs = triton_per_token_group_quant(x_TD, group)
    h_PI = common.workspace((P, I), torch.float32, x_TD.device)
    up, down = tiny.up, tiny.down
    bk, tiles = _tiles(up.BLOCK_SIZE_K, D)
    _tiny_fp8_up_kernel[(P, triton.cdiv(I, up.BLOCK_SIZE_N))](
        xq, xs, w13q_EFD, w13s, h_PI, ids_P, map_G, P, num_ids, I, D, top_k, up_row, xq.stride(0), xs.stride(0),
        w13q_EFD.stride(0), w13q_EFD.stride(1), w13s.stride(0), w13s.stride(1), h_PI.stride(0), alpha, limit,
        SCALE_N=bn_s, GROUP=group, BLOCK_N=up.BLOCK_SIZE_N, BLOCK_K=bk, K_TILES=tiles, HAS_MAP=has_map, ACT=act,
        num_warps=up.num_warps, num_stages=up.num_stages)
    hq, hs = triton_per_token_group_quant(h_PI, group)
    bk, tiles = _tiles(down.BLOCK_SIZE_K, I)
    bn = gemv_block_n(down.BLOCK_SIZE_N, T, D, num_sms(x_TD.device), down.num_warps)
    _tiny_fp8_down_kernel[(T, triton.cdiv(D, bn))](
        hq, hs, w2q_EDI, w2s, out, ids_P, map_G, weights_P, P, num_ids, D, I, hq.stride(0), hs.stride(0),
        w2q_EDI.stride(0), w2q_EDI.stride(1), w2s.stride(0), w2s.stride(1), out.stride(0),
        SCALE_N=bn_s, GROUP=group, TOP_K=top_k, KP=triton.next_power_of_2(top_k), BLOCK_N=bn, BLOCK_K=bk,
        K_TILES=tiles, HAS_MAP=has_map, INTERPRET=common.interpreting(x_TD), num_warps=down.num_warps,
        num_stages=down.num_stages)
    return out
