"""The FP8 block-scaled fused MoE for tiny batches (decode): the float tiny path's two GEMVs
(kernels/triton_moe_tiny.py) reading e4m3 expert weights, W8A8 as fp8.reference_fused_moe_fp8 computes it.

Legend: T tokens, D hidden, E local experts, I expert intermediate size, U the up rows' first row (fp8.up_row), K
top-k, P = T*K pairs, Gd = ceil(D / Bk), Gi = ceil(I / Bk), Bn x Bk the weight block (128 x 128 published).

Two launches in the engine's form, no alignment and no sum pass (the sorted FP8 path at one token is five):
1. x quantized per token and Bk group: xq [T, D] e4m3, xs [T, Gd]; by the norm before the MoE in its own launch
   (`x_fp8`: triton_norm.triton_add_rms_norm_fp8, issue 80), else by a launch here
   (triton_fp8.triton_per_token_group_quant).
2. Gate-up GEMV, grid (P, I / BLOCK_N): a K tile is [BLOCK_N, BLOCK_K / g, g] (g = min(BLOCK_K, Bk): one scale
   group a row of the middle axis), so each group's x scale and weight block scale are loaded once a group and
   folded into x's values ([1, groups, 1] times [1, groups, g]); the products are then one FMA a value against the
   e4m3 weights. A program's rows lie in one weight scale block (BLOCK_N narrowed to divide Bn and the up rows'
   offset: `fp8_tiny_up_block_n`). act(gate) * up in fp32 into h_PI (fp32: the reference quantizes the fp32
   activation, not a rounded one); then h quantized per pair and Bk group in the same launch: the program that
   finishes a group last quantizes it (`_quant_h_group`: hq [P, I], hs [P, Gi]; `quant_h=False`: a launch of its
   own, the form before).
3. Down GEMV + top-k sum, grid (T, D / BLOCK_N), the float path's walk (pairs in order into one fp32 tile, each
   pair's h scale, weight block scale and routed weight folded into h's values): deterministic, no atomics.
K is walked as the float GEMVs walk it (triton_moe_tiny.UNROLLED: steps of unrolled tiles, no loop where one step
fits): Triton does not pipeline loads that feed no dot, and unrolled tiles let ptxas issue them back to back. Each
e4m3 weight byte is read once a (token, expert) pair: at one token, once. Registers (compile_report_tiny, sm_90 /
sm_100): 56-146, no spills at any model shape; the first version gathered the scales as [BLOCK_N, BLOCK_K] fp32
tiles (64 registers a thread) and spilled at DeepSeek-V3's width.
Quantizing x and h per expert tile instead (every program quantizing the whole row it reads: P x I / BLOCK_N
programs each dividing D values, DeepSeek-V3 at one token ~175 M IEEE divisions, more ALU time than the weights'
memory time) is why each is quantized once, where it is made.
Choice: `path="tiny"` of triton_fused_moe_fp8, or a TINY entry of the FP8 launch config (T*K <= max_pairs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .fp8 import FP8_DTYPE
from .moe_align import _local_expert
from .moe_config import TinyConfig, TinyGemm
from .triton_common import activation_epilogue
from .triton_fp8 import quant_tile, triton_per_token_group_quant
from .triton_moe_tiny import (UNROLLED, gemv_block_n, num_sms, tiny_columns, tiny_down_epilogue, tiny_down_program,
                              tiny_up_program)

# The e4m3 GEMVs' blocks (1-byte weights: a warp's 16-byte lanes span 512 values). Gate-up 2 rows x 1024 at 4 warps:
# a thread's tile is one 16-byte load of a gate row and one of an up row, 32 fp32 accumulators. Down one row x 1024
# at one warp: no cross-warp reduction (no shared memory, no barrier), DeepSeek-V3's 8 pairs x 2 tiles unrolled in
# one step, 18 loads (172 B) a thread in flight and 19 programs an SM: ~100 KB in flight an SM, where 2 rows x 512
# (a K loop of two steps) kept 35 KB. BLOCK_K is clamped to the dimension's power of two, BLOCK_N narrowed as the
# float one and to the weight block's rows (`fp8_tiny_up_block_n`). compile_report_tiny: 0 spills at every shape.
DEFAULT_TINY_FP8 = TinyConfig(64, TinyGemm(2, 1024, 4, 1), TinyGemm(1, 1024, 1, 1))


@triton.jit
def _group_tile(k0, NG: tl.constexpr, INNER: tl.constexpr, GROUP: tl.constexpr):
    """A K tile as [1, NG, INNER] columns (INNER <= GROUP, both powers of two: one scale group a row of the tile)
    and its groups' scale index and first column [1, NG, 1]. The scales are then loaded once a group, not once a
    value: a [BN, BK] gather of them cost 64 fp32 registers a thread and spilled at DeepSeek-V3's width."""
    first = k0 + tl.arange(0, NG)[None, :, None] * INNER
    return first + tl.arange(0, INNER)[None, None, :], first // GROUP, first


@triton.jit(do_not_specialize=["num_pairs"])
def _tiny_fp8_up_kernel(xq_ptr, xs_ptr, w_ptr, ws_ptr, h_ptr, ids_ptr, map_ptr, num_pairs, num_ids, inter, hidden,
                        top_k, up_row, stride_xt, stride_xst, stride_we, stride_wf, stride_wse, stride_wsf, stride_hp,
                        alpha, limit, hq_ptr, hs_ptr, count_ptr, SCALE_N: tl.constexpr, GROUP: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INNER: tl.constexpr, K_TILES: tl.constexpr,
                        ONE_STEP: tl.constexpr, HAS_MAP: tl.constexpr, ACT: tl.constexpr, QUANT_H: tl.constexpr,
                        INTERPRET: tl.constexpr):
    # A program's BLOCK_N gate rows lie in one weight scale block, and so do its up rows (the wrapper narrows
    # BLOCK_N to divide the block's rows and up_row): each K group's weight scale is one value per tile, folded
    # with x's group scale into x's values before the FMA with the e4m3 weights.
    pair, expert = tiny_up_program(ids_ptr, map_ptr, num_pairs, num_ids, HAS_MAP)
    if expert < 0:
        return
    offs_n, n_ok = tiny_columns(inter, BLOCK_N)
    e64 = expert.to(tl.int64)
    row0 = tl.program_id(1) * BLOCK_N
    w_g = w_ptr + e64 * stride_we + offs_n[:, None, None].to(tl.int64) * stride_wf
    s_g = ws_ptr + e64 * stride_wse + (row0 // SCALE_N) * stride_wsf
    s_u = ws_ptr + e64 * stride_wse + ((row0 + up_row) // SCALE_N) * stride_wsf
    t = (pair // top_k).to(tl.int64)
    ops = (xq_ptr + t * stride_xt, xs_ptr + t * stride_xst, w_g, w_g + up_row * stride_wf, s_g, s_u)
    acc_g = tl.zeros([BLOCK_N, BLOCK_K // INNER, INNER], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K // INNER, INNER], dtype=tl.float32)
    if ONE_STEP:  # (no loop at all: ptxas hoists loads less far inside a runtime loop, compile_report_tiny)
        acc_g, acc_u = _fp8_up_step(acc_g, acc_u, ops, n_ok, 0, hidden, GROUP, BLOCK_K, INNER, K_TILES)
    else:
        for k_step in range(0, hidden, BLOCK_K * K_TILES):
            acc_g, acc_u = _fp8_up_step(acc_g, acc_u, ops, n_ok, k_step, hidden, GROUP, BLOCK_K, INNER, K_TILES)
    gate = tl.sum(tl.sum(acc_g, axis=2), axis=1)
    up = tl.sum(tl.sum(acc_u, axis=2), axis=1)
    h = activation_epilogue(gate, up, alpha, limit, ACT)
    tl.store(h_ptr + pair.to(tl.int64) * stride_hp + offs_n, h, mask=n_ok)
    if QUANT_H:
        _quant_h_group(h_ptr, hq_ptr, hs_ptr, count_ptr, pair, row0, inter, stride_hp, GROUP, BLOCK_N, INTERPRET)


@triton.jit
def _quant_h_group(h_ptr, hq_ptr, hs_ptr, count_ptr, pair, row0, inter, stride_hp, GROUP: tl.constexpr,
                   BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr):
    """h's quantization in the gate-up launch (no launch of its own): the program that finishes a pair's GROUP-row
    group of h last quantizes it (fp32 h -> hq e4m3, hs: quant_tile, bit for bit triton_per_token_group_quant).
    Each program counts itself in the group's counter (acq_rel at GPU scope, after a barrier: every thread's h
    stores are released with it); the one that reads count - 1 sees every other program's h, quantizes, and resets
    the counter to 0 for the next launch (the counters are zeros between launches: no memset launch either)."""
    grp = row0 // GROUP
    rows = tl.minimum(inter - grp * GROUP, GROUP)
    programs = (rows + BLOCK_N - 1) // BLOCK_N  # this group's programs (BLOCK_N divides GROUP)
    groups = (inter + GROUP - 1) // GROUP
    slot = count_ptr + pair.to(tl.int64) * groups + grp
    tl.debug_barrier()
    seen = tl.atomic_add(slot, 1, sem="acq_rel")
    if seen == programs - 1:
        cols = grp * GROUP + tl.arange(0, GROUP)
        ok = cols < inter
        p64 = pair.to(tl.int64)
        # .cg: from L2, never a line this SM's L1 may hold from before the other programs' stores
        h = tl.load(h_ptr + p64 * stride_hp + cols, mask=ok, other=0.0, cache_modifier=".cg")
        hq, hs = quant_tile(tl.reshape(h, [1, GROUP]), 1, GROUP, INTERPRET)
        tl.store(hq_ptr + p64 * inter + cols, tl.reshape(hq, [GROUP]), mask=ok)
        tl.store(hs_ptr + p64 * groups + grp + tl.arange(0, 1), tl.reshape(hs, [1]))
        tl.atomic_xchg(slot, 0, sem="relaxed")


@triton.jit
def _fp8_up_step(acc_g, acc_u, ops, n_ok, k_step, hidden, GROUP: tl.constexpr, BLOCK_K: tl.constexpr,
                 INNER: tl.constexpr, K_TILES: tl.constexpr):
    """K_TILES tiles of the gate-up GEMV from column k_step, unrolled: a tile's loads wait on nothing before."""
    x_row, xs_row, w_g, w_u, s_g, s_u = ops
    row_ok = n_ok[:, None, None]
    for kt in tl.static_range(K_TILES):
        k, grp, first = _group_tile(k_step + kt * BLOCK_K, BLOCK_K // INNER, INNER, GROUP)
        k_ok = k < hidden
        g_ok = first < hidden
        a = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)
        xs = tl.load(xs_row + grp, mask=g_ok, other=0.0)
        a_g = a * (xs * tl.load(s_g + grp, mask=g_ok, other=0.0))
        a_u = a * (xs * tl.load(s_u + grp, mask=g_ok, other=0.0))
        acc_g += tl.load(w_g + k, mask=row_ok & k_ok, other=0.0).to(tl.float32) * a_g
        acc_u += tl.load(w_u + k, mask=row_ok & k_ok, other=0.0).to(tl.float32) * a_u
    return acc_g, acc_u


@triton.jit(do_not_specialize=["num_pairs"])
def _tiny_fp8_down_kernel(hq_ptr, hs_ptr, w_ptr, ws_ptr, out_ptr, ids_ptr, map_ptr, weights_ptr, num_pairs, num_ids,
                          hidden, inter, stride_hp, stride_hsp, stride_we, stride_wd, stride_wse, stride_wsd, stride_ot,
                          SCALE_N: tl.constexpr, GROUP: tl.constexpr, TOP_K: tl.constexpr, KP: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INNER: tl.constexpr, K_TILES: tl.constexpr,
                          ONE_STEP: tl.constexpr, HAS_MAP: tl.constexpr, INTERPRET: tl.constexpr):
    # The token's pairs in order into one fp32 tile (deterministic, no atomics), each pair's h group scale, weight
    # block scale and routed weight folded into h's values; BLOCK_N divides the weight block's rows (one scale row).
    t, offs_n, n_ok, pair_p, expert_p, live_p, w_p = tiny_down_program(ids_ptr, map_ptr, weights_ptr, num_pairs,
                                                                       num_ids, hidden, BLOCK_N, TOP_K, KP, HAS_MAP)
    rows = offs_n[:, None, None].to(tl.int64) * stride_wd
    s_rows = ((tl.program_id(1) * BLOCK_N) // SCALE_N) * stride_wsd
    ops = (hq_ptr, hs_ptr, w_ptr, ws_ptr, ids_ptr, map_ptr, weights_ptr, rows, s_rows)
    strides = (stride_hp, stride_hsp, stride_we, stride_wse)
    acc = tl.zeros([BLOCK_N, BLOCK_K // INNER, INNER], dtype=tl.float32)
    if ONE_STEP:
        acc = _fp8_down_step(acc, ops, strides, t, n_ok, 0, num_pairs, num_ids, inter, GROUP, TOP_K, BLOCK_K, INNER,
                             K_TILES, HAS_MAP)
    else:
        for k_step in range(0, inter, BLOCK_K * K_TILES):
            acc = _fp8_down_step(acc, ops, strides, t, n_ok, k_step, num_pairs, num_ids, inter, GROUP, TOP_K, BLOCK_K,
                                 INNER, K_TILES, HAS_MAP)
    tiny_down_epilogue(tl.sum(tl.sum(acc, axis=2), axis=1), t, expert_p, live_p, w_p, offs_n, n_ok, weights_ptr, 0,
                       out_ptr, stride_ot, False, INTERPRET)


@triton.jit
def _fp8_down_step(acc, ops, strides, t, n_ok, k_step, num_pairs, num_ids, inter, GROUP: tl.constexpr,
                   TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, INNER: tl.constexpr, K_TILES: tl.constexpr,
                   HAS_MAP: tl.constexpr):
    """Token t's pairs in order, K_TILES tiles of I from column k_step each, unrolled; a remote or invalid pair's
    lanes are masked off (its memory is never read)."""
    hq_ptr, hs_ptr, w_ptr, ws_ptr, ids_ptr, map_ptr, weights_ptr, rows, s_rows = ops
    stride_hp, stride_hsp, stride_we, stride_wse = strides
    for j in tl.static_range(TOP_K):
        pair = t * TOP_K + j
        expert = _local_expert(ids_ptr, map_ptr, pair, num_pairs, num_ids, HAS_MAP)
        w = tl.load(weights_ptr + pair, mask=expert >= 0, other=0.0).to(tl.float32)
        live = (tl.zeros([1, 1, 1], dtype=tl.int32) + expert) >= 0  # (a tile mask: see triton_moe_tiny)
        e64 = tl.maximum(expert, 0).to(tl.int64)
        h_row = hq_ptr + pair.to(tl.int64) * stride_hp
        hs_row = hs_ptr + pair.to(tl.int64) * stride_hsp
        b_rows = w_ptr + e64 * stride_we + rows
        s_row = ws_ptr + e64 * stride_wse + s_rows
        for kt in tl.static_range(K_TILES):
            k, grp, first = _group_tile(k_step + kt * BLOCK_K, BLOCK_K // INNER, INNER, GROUP)
            k_ok = live & (k < inter)
            g_ok = live & (first < inter)
            a = tl.load(h_row + k, mask=k_ok, other=0.0).to(tl.float32)
            scale = tl.load(hs_row + grp, mask=g_ok, other=0.0) * tl.load(s_row + grp, mask=g_ok, other=0.0) * w
            b = tl.load(b_rows + k, mask=n_ok[:, None, None] & k_ok, other=0.0)
            acc += b.to(tl.float32) * (a * scale)
    return acc


_COUNTS: dict[torch.device, torch.Tensor] = {}


def h_outputs(pairs: int, inter: int, group: int, device: torch.device):
    """(hq [P, I] e4m3, hs [P, Gi] fp32, the group counters [P * Gi] int32) of the fused h quantization. The
    counters persist per device, zeros between launches (the last program of each group resets its own), so a
    call never clears them: grown (zeros) only when a call needs more, which start-up warm-up does before any
    CUDA graph is captured. One set a device: the launches that use them run one at a time (one stream: the step's
    micro-batches and layers are issued in order on it)."""
    groups = triton.cdiv(inter, group)
    counts = _COUNTS.get(device)
    if counts is None or counts.numel() < pairs * groups:
        counts = _COUNTS[device] = torch.zeros(max(pairs * groups, 1024), dtype=torch.int32, device=device)
    return (common.workspace((pairs, inter), FP8_DTYPE, device),
            common.workspace((pairs, groups), torch.float32, device), counts)


def _k_walk(block_k: int, dim: int, group: int, copies: int = 1) -> dict:
    """BLOCK_K (clamped to the dimension's power of two), its scale-group rows INNER, and the float path's K steps
    (UNROLLED: K_TILES tiles a step, `copies` bodies each, ONE_STEP when one step covers the dimension)."""
    bk, walk = UNROLLED.tiles(block_k, dim, copies)
    return dict(BLOCK_K=bk, INNER=min(bk, group), K_TILES=walk["K_TILES"], ONE_STEP=walk["ONE_STEP"])


def _low_bit(n: int) -> int:
    return n & -n


def fp8_tiny_up_block_n(widest: int, scale_n: int, up_row: int) -> int:
    """The gate-up GEMV's BLOCK_N: the config's, narrowed (powers of two) until a program's gate rows and its up rows
    each lie in one weight scale block (it divides the block's rows and up_row)."""
    return min(widest, _low_bit(scale_n), _low_bit(up_row) if up_row else widest)


def fp8_tiny_down_block_n(widest: int, num_tokens: int, hidden: int, sms: int, num_warps: int, scale_n: int) -> int:
    """The down GEMV's BLOCK_N: the float GEMV's narrowing (`gemv_block_n`), then no wider than what divides the
    weight block's rows. Host arithmetic on shapes only (graph-safe; moe_variants plans the same)."""
    return min(gemv_block_n(widest, num_tokens, hidden, sms, num_warps), _low_bit(scale_n))


def tiny_fused_moe_fp8(x_TD, w13q_EFD, w13s, w2q_EDI, w2s, weights_P, ids_P, expert_map_G, block: tuple[int, int],
                       up_row: int, act_args: tuple[int, float, float], out: torch.Tensor, tiny: TinyConfig,
                       top_k: int, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
                       quant_h: bool = True) -> torch.Tensor:
    """The launches above into `out` [T, D]; inputs checked and contiguous (triton_fused_moe_fp8). `x_fp8`: x
    already quantized (xq [T, D] e4m3, xs [T, Gd]: the norm before the MoE wrote them,
    triton_norm.triton_add_rms_norm_fp8), so launch 1 is not run; `quant_h` (the default) quantizes h inside the
    gate-up launch (`_quant_h_group`), so launch 3 is not run either: two launches in all with both. No host
    sync: grids from shapes only."""
    T, D = x_TD.shape
    E, I, P = w13q_EFD.shape[0], w2q_EDI.shape[2], ids_P.numel()
    bn_s, group = block
    has_map = expert_map_G is not None
    map_G = expert_map_G if has_map else ids_P
    num_ids = expert_map_G.numel() if has_map else E
    act, alpha, limit = act_args
    xq, xs = x_fp8 if x_fp8 is not None else triton_per_token_group_quant(x_TD, group)
    h_PI = common.workspace((P, I), torch.float32, x_TD.device)
    up, down = tiny.up, tiny.down
    bn = fp8_tiny_up_block_n(up.BLOCK_SIZE_N, bn_s, up_row)
    hq, hs, counts = h_outputs(P, I, group, x_TD.device) if quant_h else (h_PI, h_PI, ids_P)
    if quant_h:
        bn = min(bn, _low_bit(group))  # a program's rows inside one h group
    _tiny_fp8_up_kernel[(P, triton.cdiv(I, bn))](
        xq, xs, w13q_EFD, w13s, h_PI, ids_P, map_G, P, num_ids, I, D, top_k, up_row, xq.stride(0), xs.stride(0),
        w13q_EFD.stride(0), w13q_EFD.stride(1), w13s.stride(0), w13s.stride(1), h_PI.stride(0), alpha, limit,
        hq, hs, counts, SCALE_N=bn_s, GROUP=group, BLOCK_N=bn, HAS_MAP=has_map, ACT=act, QUANT_H=quant_h,
        INTERPRET=common.interpreting(x_TD), num_warps=up.num_warps, num_stages=up.num_stages,
        **_k_walk(up.BLOCK_SIZE_K, D, group))
    if not quant_h:
        hq, hs = triton_per_token_group_quant(h_PI, group)
    bn = fp8_tiny_down_block_n(down.BLOCK_SIZE_N, T, D, num_sms(x_TD.device), down.num_warps, bn_s)
    _tiny_fp8_down_kernel[(T, triton.cdiv(D, bn))](
        hq, hs, w2q_EDI, w2s, out, ids_P, map_G, weights_P, P, num_ids, D, I, hq.stride(0), hs.stride(0),
        w2q_EDI.stride(0), w2q_EDI.stride(1), w2s.stride(0), w2s.stride(1), out.stride(0),
        SCALE_N=bn_s, GROUP=group, TOP_K=top_k, KP=triton.next_power_of_2(top_k), BLOCK_N=bn, HAS_MAP=has_map,
        INTERPRET=common.interpreting(x_TD), num_warps=down.num_warps, num_stages=down.num_stages,
        **_k_walk(down.BLOCK_SIZE_K, I, group, copies=top_k))
    return out
