"""The fused MoE for tiny batches (decode): two launches, no alignment, no top-k sum pass.

Legend: T tokens, D hidden, E local experts, I expert intermediate size, F = 2I, K top-k, P = T*K pairs.

At one to a few tokens the sorted path (kernels/triton_moe.py) is launch- and latency-bound, not
bandwidth-bound: four kernels (align, gate-up, down, sum) each wait for the one before, and each M block
of 16 rows carries one real row. Here:
1. Gate-up GEMV, grid (P, I / BLOCK_N): program (p, n) reads the pair's expert straight from topk_ids
   (through the expert map), its token's x row and the gate and up rows [n, n+BN) of w13, and writes
   act(gate)·up into h_PI[p] (x's dtype, as the sorted path rounds h). A remote or invalid expert's program
   exits: its h row is never written and never read.
2. Down GEMV + top-k sum, grid (T, D / BLOCK_N): program (t, n) loads the token's K pairs side by side
   ([K, BN, BK] tiles of w2 rows of the K experts), accumulating Σ_k w[t,k] · h[t,k] · w2[e]ᵀ
   (+ w[t,k] · b2[e]) for the output columns [n, n+BN) in fp32, and stores the token's row once. No atomics, no y_PD round trip, a fixed summation order: bit-identical run
   to run (what combine="sum" promises), for any `combine` argument.
Both kernels are GEMVs on the CUDA cores (a [BN, BK] fp32 tile of products, reduced once at the end): with
one row per expert an MMA of M = 16 would waste 15/16 of its work and gain nothing on a memory-bound step.
A token's output is only D / BLOCK_N programs (Qwen3: 128 at BN = 16, fewer than two per H100 SM), so the
wrapper narrows the down kernel's N (down to 8) until the grid gives every SM two programs: more rows of
w2 in flight at once, the work of a split-K with no partial sums to merge.
Choice: `TinyConfig.max_pairs` in the launch config (kernels/moe_config.py); a function of T*K only, known
on the host, so a CUDA graph captured for a batch size always replays the same path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .moe_align import _local_expert
from .moe_config import TinyConfig
from .triton_common import activation_epilogue, cast


@triton.jit(do_not_specialize=["num_pairs"])
def _tiny_up_kernel(x_ptr, w13_ptr, h_ptr, ids_ptr, map_ptr, b13_ptr, num_pairs, num_ids, inter, hidden, top_k,
                    stride_xt, stride_we, stride_wf, stride_hp, stride_be, alpha, limit,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr, ONE_STEP: tl.constexpr,
                    EVEN_K: tl.constexpr, HAS_MAP: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                    INTERPRET: tl.constexpr):
    # K in steps of K_TILES tiles, each step unrolled (static_range): no tile's loads wait on an earlier tile's
    # products, so ptxas issues them back to back and a program keeps most of its rows' bytes in flight (Triton does
    # not pipeline loads that feed no dot: a rolled loop of one tile a step waits one DRAM round trip per tile). x's
    # row is loaded as [1, BK], in the weight tile's own layout: a 1-D load needs a shared-memory layout conversion
    # and two barriers every tile.
    pair, expert = tiny_up_program(ids_ptr, map_ptr, num_pairs, num_ids, HAS_MAP)
    if expert < 0:
        return
    offs_n, n_ok = tiny_columns(inter, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)[None, :]
    x_ptrs = x_ptr + (pair // top_k).to(tl.int64) * stride_xt + offs_k
    g_ptrs = w13_ptr + expert.to(tl.int64) * stride_we + offs_n[:, None].to(tl.int64) * stride_wf + offs_k
    u_ptrs = g_ptrs + inter * stride_wf
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if ONE_STEP:  # (no loop at all: ptxas hoists loads less far inside a runtime loop, compile_report_tiny)
        acc_g, acc_u = _up_step(acc_g, acc_u, x_ptrs, g_ptrs, u_ptrs, n_ok, offs_k, 0, hidden, BLOCK_K, K_TILES,
                                ONE_STEP, EVEN_K)
    else:
        for k_step in range(0, hidden, BLOCK_K * K_TILES):
            acc_g, acc_u = _up_step(acc_g, acc_u, x_ptrs, g_ptrs, u_ptrs, n_ok, offs_k, k_step, hidden, BLOCK_K,
                                    K_TILES, ONE_STEP, EVEN_K)
    tiny_up_epilogue(tl.sum(acc_g, axis=1), tl.sum(acc_u, axis=1), pair, expert, offs_n, n_ok, h_ptr, stride_hp,
                     b13_ptr, stride_be, inter, alpha, limit, HAS_BIAS, ACT, INTERPRET)


@triton.jit
def _up_step(acc_g, acc_u, x_ptrs, g_ptrs, u_ptrs, n_ok, offs_k, k_step, hidden, BLOCK_K: tl.constexpr,
             K_TILES: tl.constexpr, ONE_STEP: tl.constexpr, EVEN_K: tl.constexpr):
    """One K step of the gate-up GEMV: K_TILES tiles from column k_step, unrolled; only tiles that may be ragged
    are masked along K (compile-time)."""
    for kt in tl.static_range(K_TILES):
        k0 = k_step + kt * BLOCK_K
        if EVEN_K or (ONE_STEP and kt < K_TILES - 1):
            a = tl.load(x_ptrs + k0).to(tl.float32)
            bg = tl.load(g_ptrs + k0, mask=n_ok[:, None], other=0.0)
            bu = tl.load(u_ptrs + k0, mask=n_ok[:, None], other=0.0)
        else:
            k_ok = offs_k < hidden - k0
            a = tl.load(x_ptrs + k0, mask=k_ok, other=0.0).to(tl.float32)
            bg = tl.load(g_ptrs + k0, mask=n_ok[:, None] & k_ok, other=0.0)
            bu = tl.load(u_ptrs + k0, mask=n_ok[:, None] & k_ok, other=0.0)
        acc_g += bg.to(tl.float32) * a
        acc_u += bu.to(tl.float32) * a
    return acc_g, acc_u


@triton.jit
def tiny_up_epilogue(gate, up, pair, expert, offs_n, n_ok, h_ptr, stride_hp, b13_ptr, stride_be, inter, alpha, limit,
                     HAS_BIAS: tl.constexpr, ACT: tl.constexpr, INTERPRET: tl.constexpr):
    """Every format's gate-up GEMV ends here: fp32 gate and up [BN] (+ the expert's biases), the activation, and the
    pair's h row in h's dtype (as the sorted path rounds h)."""
    if HAS_BIAS:
        b_ptr = b13_ptr + expert.to(tl.int64) * stride_be
        gate += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        up += tl.load(b_ptr + inter + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    h = activation_epilogue(gate, up, alpha, limit, ACT)
    tl.store(h_ptr + pair.to(tl.int64) * stride_hp + offs_n, cast(h, h_ptr.dtype.element_ty, INTERPRET), mask=n_ok)


@triton.jit(do_not_specialize=["num_pairs"])
def _tiny_down_kernel(h_ptr, w2_ptr, out_ptr, ids_ptr, map_ptr, weights_ptr, b2_ptr, num_pairs, num_ids, hidden,
                      inter, stride_hp, stride_we, stride_wd, stride_ot, stride_be,
                      TOP_K: tl.constexpr, KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      K_TILES: tl.constexpr, ONE_STEP: tl.constexpr, EVEN_K: tl.constexpr, HAS_MAP: tl.constexpr,
                      HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr):
    # Each step: the token's K pairs one after another, K_TILES tiles of I each, all unrolled: every load is
    # independent of the products before it (see the gate-up kernel), and the pairs are summed into one [BN, BK]
    # fp32 tile in a fixed order (pair 0 first), reduced along BK once at the end: no per-tile cross-warp sum.
    # A remote or invalid pair's lanes are masked off: its memory is never read.
    t, offs_n, n_ok, pair_p, expert_p, live_p, w_p = tiny_down_program(ids_ptr, map_ptr, weights_ptr, num_pairs,
                                                                       num_ids, hidden, BLOCK_N, TOP_K, KP, HAS_MAP)
    offs_k = tl.arange(0, BLOCK_K)[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if ONE_STEP:
        acc = _down_step(acc, t, 0, h_ptr, w2_ptr, ids_ptr, map_ptr, weights_ptr, num_pairs, num_ids, inter, stride_hp,
                         stride_we, stride_wd, offs_n, n_ok, offs_k, TOP_K, BLOCK_K, K_TILES, ONE_STEP, EVEN_K, HAS_MAP)
    else:
        for k_step in range(0, inter, BLOCK_K * K_TILES):
            acc = _down_step(acc, t, k_step, h_ptr, w2_ptr, ids_ptr, map_ptr, weights_ptr, num_pairs, num_ids, inter,
                             stride_hp, stride_we, stride_wd, offs_n, n_ok, offs_k, TOP_K, BLOCK_K, K_TILES, ONE_STEP,
                             EVEN_K, HAS_MAP)
    tiny_down_epilogue(tl.sum(acc, axis=1), t, expert_p, live_p, w_p, offs_n, n_ok, b2_ptr, stride_be, out_ptr,
                       stride_ot, HAS_BIAS, INTERPRET)


@triton.jit
def _down_step(acc, t, k_step, h_ptr, w2_ptr, ids_ptr, map_ptr, weights_ptr, num_pairs, num_ids, inter, stride_hp,
               stride_we, stride_wd, offs_n, n_ok, offs_k, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr,
               K_TILES: tl.constexpr, ONE_STEP: tl.constexpr, EVEN_K: tl.constexpr, HAS_MAP: tl.constexpr):
    """One K step of the down GEMV: token t's pairs in order, K_TILES tiles of I from column k_step each, unrolled,
    each scaled by its routed weight and added into acc."""
    for k in tl.static_range(TOP_K):
        pair = t * TOP_K + k
        expert = _local_expert(ids_ptr, map_ptr, pair, num_pairs, num_ids, HAS_MAP)
        w = tl.load(weights_ptr + pair, mask=expert >= 0, other=0.0).to(tl.float32)
        h_ptrs = h_ptr + pair.to(tl.int64) * stride_hp + offs_k
        b_ptrs = (w2_ptr + tl.maximum(expert, 0).to(tl.int64) * stride_we
                  + offs_n[:, None].to(tl.int64) * stride_wd + offs_k)
        # (the expert broadcast before the compare: the interpreter refuses a scalar bool with a tile mask)
        h_ok = (tl.zeros([1, BLOCK_K], dtype=tl.int32) + expert) >= 0
        row_ok = n_ok[:, None] & h_ok
        for kt in tl.static_range(K_TILES):
            k0 = k_step + kt * BLOCK_K
            if EVEN_K or (ONE_STEP and kt < K_TILES - 1):
                a = tl.load(h_ptrs + k0, mask=h_ok, other=0.0).to(tl.float32)
                b = tl.load(b_ptrs + k0, mask=row_ok, other=0.0)
            else:
                k_ok = offs_k < inter - k0
                a = tl.load(h_ptrs + k0, mask=h_ok & k_ok, other=0.0).to(tl.float32)
                b = tl.load(b_ptrs + k0, mask=row_ok & k_ok, other=0.0)
            acc += b.to(tl.float32) * (a * w)  # the routed weight scales h: linear, so the same sum
    return acc


@triton.jit
def tiny_up_program(ids_ptr, map_ptr, num_pairs, num_ids, HAS_MAP: tl.constexpr):
    """Every format's gate-up GEMV starts here: the program's pair and its local expert (-1: nothing to do, the
    kernel returns before anything else; its columns come after, `tiny_columns`: computed first, they cost the
    MXFP4 GEMV 2 to 4 registers)."""
    pair = tl.program_id(0)
    return pair, _local_expert(ids_ptr, map_ptr, pair, num_pairs, num_ids, HAS_MAP)


@triton.jit
def tiny_columns(size, BLOCK_N: tl.constexpr):
    """A GEMV program's output columns (program_id(1)'s block of BLOCK_N) and which of them lie below `size`."""
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_n, offs_n < size


@triton.jit
def tiny_down_program(ids_ptr, map_ptr, weights_ptr, num_pairs, num_ids, hidden, BLOCK_N: tl.constexpr,
                      TOP_K: tl.constexpr, KP: tl.constexpr, HAS_MAP: tl.constexpr):
    """Every format's down GEMV starts here: the program's token t, its output columns (offs_n, n_ok) and its pair
    lanes (pair, local expert, live, routed weight: `tiny_token_pairs`)."""
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    pair_p, expert_p, live_p, w_p = tiny_token_pairs(t, ids_ptr, map_ptr, weights_ptr, num_pairs, num_ids, TOP_K, KP,
                                                     HAS_MAP)
    return t, offs_n, offs_n < hidden, pair_p, expert_p, live_p, w_p


@triton.jit
def tiny_token_pairs(t, ids_ptr, map_ptr, weights_ptr, num_pairs, num_ids, TOP_K: tl.constexpr, KP: tl.constexpr,
                     HAS_MAP: tl.constexpr):
    """Token t's KP pair lanes for a down GEMV: (pair [KP], local expert (-1: none), live mask, routed weight; 0 on
    dead lanes, whose memory is never read)."""
    lanes = tl.arange(0, KP)
    pair_p = t * TOP_K + lanes
    expert_p = _local_expert(ids_ptr, map_ptr, pair_p, num_pairs, num_ids, HAS_MAP)
    live_p = (lanes < TOP_K) & (expert_p >= 0)
    w_p = tl.load(weights_ptr + pair_p, mask=live_p, other=0.0).to(tl.float32)
    return pair_p, expert_p, live_p, w_p


@triton.jit
def tiny_down_epilogue(y, t, expert_p, live_p, w_p, offs_n, n_ok, b2_ptr, stride_be, out_ptr, stride_ot,
                       HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr):
    """Every format's down GEMV ends here: the token's fp32 sum y [BN] (+ Σ_k w_k · b2[e_k]) stored once."""
    if HAS_BIAS:  # scaled by the routed weight, as the reference applies it
        b2_ptrs = b2_ptr + tl.maximum(expert_p, 0).to(tl.int64)[:, None] * stride_be + offs_n[None, :]
        b2 = tl.load(b2_ptrs, mask=live_p[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        y += tl.sum(b2 * w_p[:, None], axis=0)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + offs_n, cast(y, out_ptr.dtype.element_ty, INTERPRET), mask=n_ok)


def down_block_n(widest: int, num_tokens: int, hidden: int, num_sms: int) -> int:
    """The packed formats' down GEMV's BLOCK_N: the config's, halved (not below 8) while the grid gives fewer than two
    programs per SM. Host arithmetic on shapes only."""
    bn = widest
    while bn > 8 and num_tokens * triton.cdiv(hidden, bn) < 2 * num_sms:
        bn //= 2
    return bn


# Warps per SM the float down GEMV's grid should give (narrowing its BLOCK_N, down to one row a program): at one
# token its programs are all there is, and each keeps ~7-9 KB in flight (compile report), so 16 one-warp programs
# an SM hold ~130 KB, above the ~40 KB an H200 SM needs to stream at full bandwidth (4.8 TB/s / 132 SMs x ~1 us).
GEMV_WARPS_PER_SM = 16


def gemv_block_n(widest: int, num_tokens: int, hidden: int, num_sms: int, num_warps: int) -> int:
    """The float down GEMV's BLOCK_N: the config's, halved (not below 1) while its grid gives fewer than
    GEMV_WARPS_PER_SM warps per SM. Host arithmetic on shapes only (graph-safe)."""
    bn = widest
    while bn > 1 and num_tokens * triton.cdiv(hidden, bn) * num_warps < GEMV_WARPS_PER_SM * num_sms:
        bn //= 2
    return bn


@dataclass(frozen=True)
class RolledK:
    """How the packed formats' GEMVs (MXFP4, INT4) walk K: a loop of BLOCK_K steps (their dequantization keeps a
    step's registers busy), the down width narrowed by `down_block_n`."""

    def tiles(self, block_k: int, dim: int, copies: int = 1) -> tuple[int, dict]:
        return block_k, {"EVEN_K": dim % block_k == 0}

    def down_block_n(self, widest: int, num_tokens: int, hidden: int, sms: int, num_warps: int) -> int:
        return down_block_n(widest, num_tokens, hidden, sms)


@dataclass(frozen=True)
class UnrolledK:
    """How the float GEMVs walk K: steps of K_TILES tiles, each step unrolled at compile time (BLOCK_K no wider than
    the dimension), so a step's loads are all in flight together; the down width narrowed by `gemv_block_n`.

    `max_bodies` caps the unrolled tile bodies of a step (K_TILES times the `copies` a step makes of them: the down
    GEMV's top-k pairs; K_TILES the largest divisor of the tile count that fits, so the steps are whole): Mixtral's
    down GEMV fully unrolled (2 pairs x 56 tiles) took 237 registers and 5.3 s to compile. One step is no loop at
    all (every Qwen3 GEMV, and every gate-up GEMV of the model shapes); more run a loop, where ptxas keeps fewer
    loads in flight (compile_report_tiny: 9 against 17 for DeepSeek-V3's down GEMV)."""

    max_bodies: int = 24

    def tiles(self, block_k: int, dim: int, copies: int = 1) -> tuple[int, dict]:
        bk = min(block_k, triton.next_power_of_2(dim))
        total = triton.cdiv(dim, bk)
        fit = max(1, self.max_bodies // max(1, copies))
        per_step = total if total <= fit else max(d for d in range(1, fit + 1) if total % d == 0)
        return bk, {"K_TILES": per_step, "ONE_STEP": total <= per_step, "EVEN_K": dim % (bk * per_step) == 0}

    def down_block_n(self, widest: int, num_tokens: int, hidden: int, sms: int, num_warps: int) -> int:
        return gemv_block_n(widest, num_tokens, hidden, sms, num_warps)


ROLLED, UNROLLED = RolledK(), UnrolledK()


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: small grids, still exercises the narrowing
    from .split_planning import num_sms as sms

    return sms(device.index if device.index is not None else torch.cuda.current_device())


def tiny_fused_moe(x_TD, w13_EFD, w2_EDI, weights_P, ids_P, expert_map_G, b13_EF, b2_ED, act: int, alpha: float,
                   limit: float, out: torch.Tensor, tiny: TinyConfig, top_k: int) -> torch.Tensor:
    """The two launches above into `out` [T, D]. Called by `triton_fused_moe` with its inputs checked and
    made row-contiguous (weights_P / ids_P are the flat [T*K] routing); no host sync."""
    E, F, D = w13_EFD.shape
    return run_tiny(_tiny_up_kernel, dict(w13_ptr=w13_EFD, stride_we=w13_EFD.stride(0), stride_wf=w13_EFD.stride(1)),
                    _tiny_down_kernel, dict(w2_ptr=w2_EDI, stride_we=w2_EDI.stride(0), stride_wd=w2_EDI.stride(1)),
                    x_TD, weights_P, ids_P, expert_map_G, b13_EF, b2_ED, (act, alpha, limit), out, tiny, top_k, E, F // 2,
                    UNROLLED)


def run_tiny(up_kernel, up_weight: dict, down_kernel, down_weight: dict, x_TD, weights_P, ids_P, expert_map_G, b13_EF,
             b2_ED, act_args: tuple[int, float, float], out: torch.Tensor, tiny: TinyConfig, top_k: int, num_experts: int,
             inter: int, k_loop: RolledK | UnrolledK = ROLLED) -> torch.Tensor:
    """Launch a format's gate-up GEMV (grid (P, I / BLOCK_N)) and down GEMV (grid (T, D / BLOCK_N), narrowed by
    `k_loop`) with the arguments every format's tiny kernels share; `up_weight` / `down_weight` are the
    format's weight operands by parameter name, `k_loop` how its kernels walk K. Returns `out`."""
    T, D = x_TD.shape
    I, P = inter, ids_P.numel()
    dev, dt = x_TD.device, x_TD.dtype
    act, alpha, limit = act_args
    interp = common.interpreting(x_TD)
    has_map = expert_map_G is not None
    map_G = expert_map_G if has_map else ids_P  # any pointer: unused without a map
    num_ids = expert_map_G.numel() if has_map else num_experts
    up, down = tiny.up, tiny.down
    up_bk, up_tiles = k_loop.tiles(up.BLOCK_SIZE_K, D)
    down_bk, down_tiles = k_loop.tiles(down.BLOCK_SIZE_K, I, top_k)
    h_PI = common.workspace((P, I), dt, dev)
    up_kernel[(P, triton.cdiv(I, up.BLOCK_SIZE_N))](
        x_ptr=x_TD, h_ptr=h_PI, ids_ptr=ids_P, map_ptr=map_G, b13_ptr=x_TD if b13_EF is None else b13_EF,
        num_pairs=P, num_ids=num_ids, inter=I, hidden=D, top_k=top_k, stride_xt=x_TD.stride(0),
        stride_hp=h_PI.stride(0), stride_be=0 if b13_EF is None else b13_EF.stride(0), alpha=alpha, limit=limit,
        BLOCK_N=up.BLOCK_SIZE_N, BLOCK_K=up_bk, HAS_MAP=has_map,
        HAS_BIAS=b13_EF is not None, ACT=act, INTERPRET=interp, num_warps=up.num_warps, num_stages=up.num_stages,
        **up_tiles, **up_weight,
    )
    bn = k_loop.down_block_n(down.BLOCK_SIZE_N, T, D, num_sms(dev), down.num_warps)
    down_kernel[(T, triton.cdiv(D, bn))](
        h_ptr=h_PI, out_ptr=out, ids_ptr=ids_P, map_ptr=map_G, weights_ptr=weights_P,
        b2_ptr=weights_P if b2_ED is None else b2_ED, num_pairs=P, num_ids=num_ids, hidden=D, inter=I,
        stride_hp=h_PI.stride(0), stride_ot=out.stride(0), stride_be=0 if b2_ED is None else b2_ED.stride(0),
        TOP_K=top_k, KP=triton.next_power_of_2(top_k), BLOCK_N=bn, BLOCK_K=down_bk,
        HAS_MAP=has_map, HAS_BIAS=b2_ED is not None, INTERPRET=interp,
        num_warps=down.num_warps, num_stages=down.num_stages, **down_tiles, **down_weight,
    )
    return out
