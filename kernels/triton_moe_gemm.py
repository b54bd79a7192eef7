"""The two GEMM kernels of the sorted fused MoE (kernels/triton_moe.py runs them): gate-up with the gated activation,
and down times the routed weight. Legend as triton_moe.py's.

Each kernel is a tile function (`_up_tile`, `_down_tile`: one [BLOCK_M, BLOCK_N] output tile) and a scheduler
around it (kernels/moe_schedule.py): one program per tile of the host-side row bound, or PERSISTENT programs that
stride over the live tiles only. The TMA constexpr swaps the pointer tiles of the weights (and of the down GEMM's
sorted, contiguous h rows) for tensor-descriptor loads; the up GEMM's A rows are gathered by pair // K, which a
Hopper TMA box cannot do, so they stay pointer loads.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .moe_schedule import _grouped_pids, _tile_pids
from .triton_common import activation_epilogue, cast, dot


@triton.jit
def _add_bias(acc, b_ptr, offs_n, n_ok):
    """acc [BM, BN] + the bias row's [BN] slice, in fp32."""
    return acc + tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _up_tile(pid_m, pid_n, x_ptr, w13_ptr, w_desc, h_ptr, sorted_ptr, expert_ids_ptr, b13_ptr,
             num_pairs, inter, hidden, top_k, stride_xt, stride_we, stride_wf, stride_wd, stride_hr, stride_be,
             alpha, limit, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             EVEN_K: tl.constexpr, FUSED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
             TMA: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of h (gate and up columns n..n+BN of expert_ids[pid_m]); nothing for a dead block."""
    expert = tl.load(expert_ids_ptr + pid_m)
    if expert >= 0:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair_m = tl.load(sorted_ptr + offs_m)
        row_ok = pair_m < num_pairs
        tok_m = (pair_m // top_k).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < inter
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + tok_m[:, None] * stride_xt + offs_k[None, :]
        w_ptr = w13_ptr + expert.to(tl.int64) * stride_we
        if TMA:
            # w13 seen as [E, 2, I, D]: a [1, 2, BN, BK] box is the gate and up rows n..n+BN at once (rows past I
            # read as zeros: the descriptor's bounds, not a mask). FUSED: one dot on the [BK, 2BN] tile with gate
            # columns then up columns (concatenated, not interleaved: a TMA box cannot interleave rows).
            n0 = pid_n * BLOCK_N
            if FUSED:
                acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
            else:
                acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, hidden, BLOCK_K):
                if EVEN_K:
                    a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                else:
                    a = tl.load(a_ptrs, mask=row_ok[:, None] & (offs_k < hidden - k0)[None, :], other=0.0)
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
                if EVEN_K:
                    a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                    b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
                else:
                    k_ok = offs_k < hidden - k0
                    a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
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
                if EVEN_K:
                    a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                    bg = tl.load(g_ptrs, mask=n_ok[None, :], other=0.0)
                    bu = tl.load(u_ptrs, mask=n_ok[None, :], other=0.0)
                else:
                    k_ok = offs_k < hidden - k0
                    a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    bg = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                    bu = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc_g = dot(a, bg, acc_g, INTERPRET, PREC)
                acc_u = dot(a, bu, acc_u, INTERPRET, PREC)
                a_ptrs += BLOCK_K
                g_ptrs += BLOCK_K * stride_wd
                u_ptrs += BLOCK_K * stride_wd
        if HAS_BIAS:
            b_ptr = b13_ptr + expert.to(tl.int64) * stride_be
            acc_g = _add_bias(acc_g, b_ptr, offs_n, n_ok)
            acc_u = _add_bias(acc_u, b_ptr + inter, offs_n, n_ok)
        h = activation_epilogue(acc_g, acc_u, alpha, limit, ACT)
        h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hr + offs_n[None, :]
        tl.store(h_ptrs, cast(h, h_ptr.dtype.element_ty, INTERPRET), mask=n_ok[None, :])


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_up_kernel(x_ptr, w13_ptr, h_ptr, sorted_ptr, expert_ids_ptr, num_rows_ptr, b13_ptr,
                   num_pairs, num_rows, num_experts, inter, hidden, top_k,
                   stride_xt, stride_we, stride_wf, stride_wd, stride_hr, stride_be, alpha, limit,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   EVEN_K: tl.constexpr, FUSED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                   PERSISTENT: tl.constexpr, TMA: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    if TMA:  # (made once per program: a persistent program reuses it for every tile)
        w_desc = tl.make_tensor_descriptor(w13_ptr, shape=[num_experts, 2, inter, hidden],
                                           strides=[stride_we, inter * stride_wf, stride_wf, 1],
                                           block_shape=[1, 2 if FUSED else 1, BLOCK_N, BLOCK_K])
    else:
        w_desc = w13_ptr  # (unused)
    num_pid_n = tl.cdiv(inter, BLOCK_N)
    if PERSISTENT:
        # The live blocks only (the alignment's padded total, read on the device): no program visits a dead one.
        live_m = tl.load(num_rows_ptr) // BLOCK_M
        for tile in range(tl.program_id(0), live_m * num_pid_n, tl.num_programs(0)):
            pid_m, pid_n = _tile_pids(tile, live_m, num_pid_n, GROUP_M)
            _up_tile(pid_m, pid_n, x_ptr, w13_ptr, w_desc, h_ptr, sorted_ptr, expert_ids_ptr, b13_ptr,
                     num_pairs, inter, hidden, top_k, stride_xt, stride_we, stride_wf, stride_wd, stride_hr, stride_be,
                     alpha, limit, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, FUSED, HAS_BIAS, ACT, TMA, INTERPRET, PREC)
    else:
        pid_m, pid_n = _grouped_pids(num_rows // BLOCK_M, num_pid_n, GROUP_M)
        _up_tile(pid_m, pid_n, x_ptr, w13_ptr, w_desc, h_ptr, sorted_ptr, expert_ids_ptr, b13_ptr,
                 num_pairs, inter, hidden, top_k, stride_xt, stride_we, stride_wf, stride_wd, stride_hr, stride_be,
                 alpha, limit, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, FUSED, HAS_BIAS, ACT, TMA, INTERPRET, PREC)


@triton.jit
def _down_tile(pid_m, pid_n, h_ptr, w2_ptr, h_desc, w_desc, y_ptr, sorted_ptr, expert_ids_ptr, weights_ptr, b2_ptr,
               num_pairs, hidden, inter, top_k, stride_hr, stride_we, stride_wd, stride_wi, stride_yr, stride_be,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
               ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr, TMA: tl.constexpr, INTERPRET: tl.constexpr,
               PREC: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of the routed-weighted down GEMM; nothing for a dead block."""
    expert = tl.load(expert_ids_ptr + pid_m)
    if expert >= 0:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair_m = tl.load(sorted_ptr + offs_m)
        row_ok = pair_m < num_pairs
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hidden
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if TMA:
            # h's sorted rows are contiguous, so A is a TMA box too; w2 [E, D, I] by [1, BN, BK] boxes. Rows past D
            # and columns past I read as zeros (the descriptors' bounds).
            m0, n0 = pid_m * BLOCK_M, pid_n * BLOCK_N
            for k0 in range(0, inter, BLOCK_K):
                a = h_desc.load([m0, k0])
                b = tl.reshape(w_desc.load([expert, n0, k0]), [BLOCK_N, BLOCK_K])
                acc = dot(a, tl.trans(b), acc, INTERPRET, PREC)
        else:
            offs_k = tl.arange(0, BLOCK_K)
            a_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hr + offs_k[None, :]
            b_ptrs = (w2_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :].to(tl.int64) * stride_wd
                      + offs_k[:, None] * stride_wi)
            for k0 in range(0, inter, BLOCK_K):
                if EVEN_K:
                    a = tl.load(a_ptrs)
                    b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
                else:
                    k_ok = offs_k < inter - k0
                    a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                    b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = dot(a, b, acc, INTERPRET, PREC)
                a_ptrs += BLOCK_K
                b_ptrs += BLOCK_K * stride_wi
        if HAS_BIAS:  # before the routed weight: it scales the bias too
            acc = _add_bias(acc, b2_ptr + expert.to(tl.int64) * stride_be, offs_n, n_ok)
        w_m = tl.load(weights_ptr + pair_m, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * w_m[:, None]
        mask = row_ok[:, None] & n_ok[None, :]
        if ATOMIC:
            tok_m = (pair_m // top_k).to(tl.int64)
            # relaxed: nothing reads these sums before the kernel ends, so no ordering is needed
            # (the default acq_rel atomic returns a value; relaxed lowers to a fire-and-forget red).
            tl.atomic_add(y_ptr + tok_m[:, None] * stride_yr + offs_n[None, :], acc, mask=mask, sem="relaxed")
        else:
            y_ptrs = y_ptr + pair_m[:, None].to(tl.int64) * stride_yr + offs_n[None, :]
            tl.store(y_ptrs, cast(acc, y_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_down_kernel(h_ptr, w2_ptr, y_ptr, sorted_ptr, expert_ids_ptr, num_rows_ptr, weights_ptr, b2_ptr,
                     num_pairs, num_rows, num_experts, hidden, inter, top_k,
                     stride_hr, stride_we, stride_wd, stride_wi, stride_yr, stride_be,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     EVEN_K: tl.constexpr, ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr, PERSISTENT: tl.constexpr,
                     TMA: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    if TMA:
        h_desc = tl.make_tensor_descriptor(h_ptr, shape=[num_rows, inter], strides=[stride_hr, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w2_ptr, shape=[num_experts, hidden, inter], strides=[stride_we, stride_wd, 1],
                                           block_shape=[1, BLOCK_N, BLOCK_K])
    else:
        h_desc, w_desc = h_ptr, w2_ptr  # (unused)
    num_pid_n = tl.cdiv(hidden, BLOCK_N)
    if PERSISTENT:
        live_m = tl.load(num_rows_ptr) // BLOCK_M
        for tile in range(tl.program_id(0), live_m * num_pid_n, tl.num_programs(0)):
            pid_m, pid_n = _tile_pids(tile, live_m, num_pid_n, GROUP_M)
            _down_tile(pid_m, pid_n, h_ptr, w2_ptr, h_desc, w_desc, y_ptr, sorted_ptr, expert_ids_ptr, weights_ptr,
                       b2_ptr, num_pairs, hidden, inter, top_k, stride_hr, stride_we, stride_wd, stride_wi, stride_yr,
                       stride_be, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, ATOMIC, HAS_BIAS, TMA, INTERPRET, PREC)
    else:
        pid_m, pid_n = _grouped_pids(num_rows // BLOCK_M, num_pid_n, GROUP_M)
        _down_tile(pid_m, pid_n, h_ptr, w2_ptr, h_desc, w_desc, y_ptr, sorted_ptr, expert_ids_ptr, weights_ptr,
                   b2_ptr, num_pairs, hidden, inter, top_k, stride_hr, stride_we, stride_wd, stride_wi, stride_yr,
                   stride_be, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, ATOMIC, HAS_BIAS, TMA, INTERPRET, PREC)
