"""Float expert weights (fp32, bf16, fp16, the activations' dtype) as a format of the sorted fused MoE: the K loops
the GEMM scaffold (kernels/triton_moe_gemm.py) runs, the two kernels, and `FloatFormat`, what the launcher
(kernels/triton_moe.py) asks of a format. Legend as triton_moe.py's.

Gate-up (`float_up_loop`): two accumulators, gate columns [n, n+BN) and up columns [I+n, I+n+BN), or with
FUSED_GATE_UP one [BLOCK_K, 2*BLOCK_N] tile and one dot of N = 2*BLOCK_N. The TMA constexpr swaps the pointer
tiles of the weights (and of the down GEMM's sorted, contiguous h rows) for tensor-descriptor loads; at its value
WS_TMA (the config's WARP_SPECIALIZE, kernels/moe_schedule.tma_mode) the down GEMM's K loop, whose A and B are both
TMA boxes, is warp-specialized (a producer warp group issues the loads, consumers the wgmmas). The gate-up GEMM
gathers its A rows by pointer, which Triton 3.6's Hopper warp specialization cannot put in a producer (its pass
asserts), so it runs with TMA alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .moe_config import GemmConfig
from .moe_schedule import TMA_ON, WS_TMA, tma_mode
from .triton_common import dot
from .triton_moe_gemm import (down_descs, gate_up_desc, load_rows, load_weights, sorted_down_gemm, sorted_up_gemm,
                              WeightFormat, store_h)

WS: tl.constexpr = tl.constexpr(WS_TMA)  # the TMA constexpr's value that warp-specializes the K loops


@triton.jit
def float_up_loop(a_ptrs, x_ops, w_ops, expert, tok_m, row_ok, offs_n, n_ok, pid_n, inter, hidden,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                  TMA: tl.constexpr, FMT: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    """UP_LOOP of float weights; FMT is FUSED_GATE_UP. w_ops = (w13_ptr, w_desc, stride_we, stride_wf, stride_wd)."""
    w13_ptr, w_desc, stride_we, stride_wf, stride_wd = w_ops
    FUSED: tl.constexpr = FMT
    offs_k = tl.arange(0, BLOCK_K)
    w_ptr = w13_ptr + expert.to(tl.int64) * stride_we
    if TMA:
        # A [1, 2, BN, BK] box is the gate and up rows n..n+BN at once. FUSED: one dot on the [BK, 2BN] tile with
        # gate columns then up columns (concatenated, not interleaved: a TMA box cannot interleave rows).
        n0 = pid_n * BLOCK_N
        if FUSED:
            acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
        else:
            acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            a = load_rows(a_ptrs, row_ok, offs_k, hidden - k0, EVEN_K)
            if FUSED:
                b = tl.reshape(w_desc.load([expert, 0, n0, k0]), [2 * BLOCK_N, BLOCK_K])
                acc = dot(a, tl.trans(b), acc, INTERPRET, PREC)
            else:
                bg = tl.reshape(w_desc.load([expert, 0, n0, k0]), [BLOCK_N, BLOCK_K])
                bu = tl.reshape(w_desc.load([expert, 1, n0, k0]), [BLOCK_N, BLOCK_K])
                acc_g = dot(a, tl.trans(bg), acc_g, INTERPRET, PREC)
                acc_u = dot(a, tl.trans(bu), acc_u, INTERPRET, PREC)
            a_ptrs += BLOCK_K
        if FUSED:
            acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, BLOCK_N]), (0, 2, 1)))
    elif FUSED:
        # One [BLOCK_K, 2*BLOCK_N] tile: column 2j is gate row n+j of w13, column 2j+1 up row I+n+j (each row
        # contiguous along D, so the interleave costs nothing at load), and one dot of N = 2*BLOCK_N: a wider
        # MMA (wgmma N up to 256) and one A operand in shared memory instead of two dots' worth.
        offs_2n = tl.arange(0, 2 * BLOCK_N)
        col_2n = pid_n * BLOCK_N + offs_2n // 2
        col_ok = col_2n < inter
        b_ptrs = w_ptr + (col_2n + (offs_2n % 2) * inter)[None, :].to(tl.int64) * stride_wf + offs_k[:, None] * stride_wd
        acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            a = load_rows(a_ptrs, row_ok, offs_k, hidden - k0, EVEN_K)
            b = load_weights(b_ptrs, col_ok, offs_k < hidden - k0, EVEN_K, False)
            acc = dot(a, b, acc, INTERPRET, PREC)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_wd
        acc_g, acc_u = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N, 2]))
    else:
        g_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wf + offs_k[:, None] * stride_wd
        u_ptrs = g_ptrs + inter * stride_wf
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            a = load_rows(a_ptrs, row_ok, offs_k, hidden - k0, EVEN_K)
            k_ok = offs_k < hidden - k0
            bg = load_weights(g_ptrs, n_ok, k_ok, EVEN_K, False)
            bu = load_weights(u_ptrs, n_ok, k_ok, EVEN_K, False)
            acc_g = dot(a, bg, acc_g, INTERPRET, PREC)
            acc_u = dot(a, bu, acc_u, INTERPRET, PREC)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K * stride_wd
            u_ptrs += BLOCK_K * stride_wd
    return acc_g, acc_u


@triton.jit
def float_down_loop(h_ops, w_ops, expert, offs_m, pid_m, offs_n, n_ok, pid_n, inter,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                    TMA: tl.constexpr, FMT: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    """DOWN_LOOP of float weights. h_ops = (h_ptr, stride_hr, h_desc), w_ops = (w2_ptr, w_desc, stride_we,
    stride_wd, stride_wi)."""
    h_ptr, stride_hr, h_desc = h_ops
    w2_ptr, w_desc, stride_we, stride_wd, stride_wi = w_ops
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if TMA:
        m0, n0 = pid_m * BLOCK_M, pid_n * BLOCK_N
        for k0 in tl.range(0, inter, BLOCK_K, warp_specialize=TMA == WS):
            a = h_desc.load([m0, k0])
            b = tl.reshape(w_desc.load([expert, n0, k0]), [BLOCK_N, BLOCK_K])
            acc = dot(a, tl.trans(b), acc, INTERPRET, PREC)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        # Padding rows of a block were written by the up kernel too, so A needs no row mask.
        a_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hr + offs_k[None, :]
        b_ptrs = (w2_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :].to(tl.int64) * stride_wd
                  + offs_k[:, None] * stride_wi)
        for k0 in range(0, inter, BLOCK_K):
            k_ok = offs_k < inter - k0
            a = tl.load(a_ptrs) if EVEN_K else tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = load_weights(b_ptrs, n_ok, k_ok, EVEN_K, False)
            acc = dot(a, b, acc, INTERPRET, PREC)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_wi
    return acc


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_up_kernel(x_ptr, w13_ptr, h_ptr, sorted_ptr, expert_ids_ptr, num_rows_ptr, b13_ptr, num_pairs, num_rows,
                   num_experts, inter, hidden, top_k, stride_xt, stride_we, stride_wf, stride_wd, stride_hr, stride_be,
                   alpha, limit, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, FUSED: tl.constexpr, HAS_BIAS: tl.constexpr,
                   ACT: tl.constexpr, PERSISTENT: tl.constexpr, TMA: tl.constexpr, INTERPRET: tl.constexpr,
                   PREC: tl.constexpr):
    w_desc = gate_up_desc(w13_ptr, num_experts, inter, inter, hidden, stride_we, stride_wf, BLOCK_N, BLOCK_K,
                          2 if FUSED else 1, TMA)
    sorted_up_gemm((sorted_ptr, expert_ids_ptr, num_pairs, top_k, inter, hidden), num_rows_ptr, num_rows,
                   (b13_ptr, stride_be, alpha, limit), (x_ptr, stride_xt),
                   (w13_ptr, w_desc, stride_we, stride_wf, stride_wd), (h_ptr, stride_hr), float_up_loop, store_h,
                   FUSED, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EVEN_K, HAS_BIAS, ACT, PERSISTENT, TMA, INTERPRET, PREC)


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_down_kernel(h_ptr, w2_ptr, y_ptr, sorted_ptr, expert_ids_ptr, num_rows_ptr, weights_ptr, b2_ptr, num_pairs,
                     num_rows, num_experts, hidden, inter, top_k, stride_hr, stride_we, stride_wd, stride_wi, stride_yr,
                     stride_be, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr,
                     PERSISTENT: tl.constexpr, TMA: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    h_desc, w_desc = down_descs(h_ptr, w2_ptr, num_rows, num_experts, hidden, inter, stride_hr, stride_we, stride_wd,
                                BLOCK_M, BLOCK_N, BLOCK_K, TMA)
    sorted_down_gemm((sorted_ptr, expert_ids_ptr, num_pairs, top_k, hidden, inter), num_rows_ptr, num_rows,
                     (b2_ptr, stride_be, weights_ptr, y_ptr, stride_yr), (h_ptr, stride_hr, h_desc),
                     (w2_ptr, w_desc, stride_we, stride_wd, stride_wi), float_down_loop, None, BLOCK_M, BLOCK_N,
                     BLOCK_K, GROUP_M, EVEN_K, ATOMIC, HAS_BIAS, PERSISTENT, TMA, INTERPRET, PREC)


@dataclass(frozen=True)
class FloatFormat(WeightFormat):
    """Float experts w13 [E, 2I, D] ([gate; up] rows) and w2 [E, D, I], in the activations' dtype."""

    w13_EFD: torch.Tensor
    w2_EDI: torch.Tensor

    def up_launch(self, g: GemmConfig, a: tuple, h: tuple) -> tuple[triton.JITFunction, dict]:
        (x_TD,), (h_RI,), w = a, h, self.w13_EFD
        return _moe_up_kernel, dict(x_ptr=x_TD, w13_ptr=w, h_ptr=h_RI, stride_xt=x_TD.stride(0), stride_we=w.stride(0),
                                    stride_wf=w.stride(1), stride_wd=w.stride(2), stride_hr=h_RI.stride(0),
                                    TMA=min(tma_mode(g, w), TMA_ON), FUSED=g.FUSED_GATE_UP)

    def down_launch(self, g: GemmConfig, h: tuple) -> tuple[triton.JITFunction, dict]:
        (h_RI,), w = h, self.w2_EDI
        return _moe_down_kernel, dict(h_ptr=h_RI, w2_ptr=w, stride_hr=h_RI.stride(0), stride_we=w.stride(0),
                                      stride_wd=w.stride(1), stride_wi=w.stride(2), TMA=tma_mode(g, w, h_RI))
