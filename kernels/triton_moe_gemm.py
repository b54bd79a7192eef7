"""The two GEMMs of the sorted fused MoE, written once for every weight format: gate-up with the gated activation,
and down times the routed weight (kernels/triton_moe.py launches them). Legend as triton_moe.py's.

Each GEMM is a scheduler (`sorted_up_gemm`, `sorted_down_gemm`: one program per tile of the host-side row bound,
or PERSISTENT programs that stride over the live tiles only, kernels/moe_schedule.py) around a tile function
(`_up_tile`, `_down_tile`: one [BLOCK_M, BLOCK_N] output tile). A tile is the same for every format: the block's
expert (nothing to do for -1) and pair ids, the row and column masks, then the format's K loop, then the epilogue:
- gate-up: the expert's biases (or, HAS_BIAS = ROW_BIAS, a bias per sorted row: LoRA's deltas), the gated
  activation (`activation_epilogue`), h stored in sorted row order;
- down: the bias, times the routed weight (which scales the bias too), one row per pair (plain stores, summed
  later) or fp32 atomics into the token's row.

A weight format plugs in as @triton.jit functions passed as constexpr arguments (Triton specialises on them, so
each format compiles to its own straight-line code, no runtime dispatch):
- `UP_LOOP(a_ptrs, x_ops, w_ops, expert, tok_m, row_ok, offs_n, n_ok, pid_n, inter, hidden, BLOCK_M, BLOCK_N,
  BLOCK_K, EVEN_K, TMA, FMT, INTERPRET, PREC) -> (acc_g, acc_u)`: the fp32 [BLOCK_M, BLOCK_N] gate and up
  accumulators of columns n..n+BN over the whole hidden dim; `a_ptrs` points at the K step's gathered x rows.
- `DOWN_LOOP(h_ops, w_ops, expert, offs_m, pid_m, offs_n, n_ok, pid_n, inter, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
  TMA, FMT, INTERPRET, PREC) -> acc`: the fp32 down accumulator over the whole intermediate dim.
- `STORE_H(h, offs_m, offs_n, n_ok, pid_n, h_ops, inter, BLOCK_N, FMT, INTERPRET)`: writes the activation tile
  in the format the down GEMM reads (`store_h`: the activation dtype; FP8 quantizes it).
`x_ops`, `w_ops`, `h_ops` are tuples of the format's own pointers, strides and tensor descriptors (x_ops and h_ops
start with the row pointer and its stride); FMT is a constexpr tuple (or value) of its compile-time switches, read
by index (`SCALE_N: tl.constexpr = FMT[0]`): a compiled kernel passes the elements of a runtime tuple as values,
so no constexpr the code needs as one (a block size, a switch) travels in x_ops, w_ops or h_ops. The host side of
a format is a `WeightFormat`. A new format is its two loops, two kernels that call `sorted_up_gemm` /
`sorted_down_gemm`, and a `WeightFormat`; a packed one (values packed along K with group scales, as INT4, MXFP4 and
NVFP4) takes the loops of kernels/triton_moe_packed.py and gives only its weight tile and dot, and `PackedFormat`.

Two Triton rules these helpers follow, which the interpreter does not check: a helper returns once (statements
after a `return` inside a constexpr `if` are traced too), and it returns one type (a tensor descriptor or, without
TMA, the pointer it would have described: the choice is made by a constexpr `if` with an `else`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .moe_config import GemmConfig, MoELaunchConfig
from .moe_schedule import _grouped_pids, _tile_pids
from .triton_common import activation_epilogue, cast


ROW_BIAS = 2  # HAS_BIAS of the gate-up GEMM: a bias per sorted row [R, F] (LoRA's deltas), not per expert


@triton.jit
def _add_bias(acc, b_ptr, offs_n, n_ok):
    """acc [BM, BN] + the bias row's [BN] slice, in fp32."""
    return acc + tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]


@triton.jit
def load_rows(a_ptrs, row_ok, offs_k, k_left, EVEN_K: tl.constexpr):
    """The [BLOCK_M, BLOCK_K] A tile of a K step: padding rows (pair id P) and columns past the reduction dim
    (`k_left` of them remain) read as zeros."""
    if EVEN_K:
        a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
    else:
        a = tl.load(a_ptrs, mask=row_ok[:, None] & (offs_k < k_left)[None, :], other=0.0)
    return a


@triton.jit
def load_weights(w_ptrs, n_ok, k_ok, EVEN_K: tl.constexpr, N_MAJOR: tl.constexpr):
    """A weight tile of a K step: output channels past N and (unless EVEN_K) reduction steps past the end read as
    zeros. N_MAJOR: [BLOCK_N, k] (MXFP4's bytes and scales), else [k, BLOCK_N] (the B operand as loaded)."""
    # (one return per helper: Triton traces the statements after a return inside a constexpr `if`)
    if N_MAJOR:
        if EVEN_K:
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0)
        else:
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0)
    elif EVEN_K:
        w = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
    else:
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
    return w


@triton.jit
def store_h(h, offs_m, offs_n, n_ok, pid_n, h_ops, inter, BLOCK_N: tl.constexpr, FMT: tl.constexpr,
            INTERPRET: tl.constexpr):
    """STORE_H of the formats whose down GEMM reads h in the activation dtype (float, MXFP4)."""
    h_ptr, stride_hr = h_ops[0], h_ops[1]
    h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hr + offs_n[None, :]
    tl.store(h_ptrs, cast(h, h_ptr.dtype.element_ty, INTERPRET), mask=n_ok[None, :])


@triton.jit
def gate_up_desc(w_ptr, num_experts, inter, up_row, hidden, stride_we, stride_wf, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, HALVES: tl.constexpr, TMA: tl.constexpr):
    """With TMA, w13 [E, U + I, D] seen as [E, 2, I, D] (gate rows [0, I), up rows [U, U + I)): a [1, HALVES, BN,
    BK] box is the gate rows n..n+BN (HALVES 1) or those and the up rows at once (2); rows past I and columns past
    D read as zeros (the descriptor's bounds, not a mask). Made once per program (a persistent program reuses it
    for every tile). Without TMA, w_ptr itself (unused)."""
    if TMA:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[num_experts, 2, inter, hidden],
                                           strides=[stride_we, up_row * stride_wf, stride_wf, 1],
                                           block_shape=[1, HALVES, BLOCK_N, BLOCK_K])
    else:
        w_desc = w_ptr
    return w_desc


@triton.jit
def down_descs(h_ptr, w_ptr, num_rows, num_experts, hidden, inter, stride_hr, stride_we, stride_wd,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TMA: tl.constexpr):
    """With TMA, descriptors of h's sorted rows (contiguous, so A is a TMA box too) and of w2 [E, D, I] by
    [1, BN, BK] boxes (rows past D and columns past I read as zeros); without, the pointers (unused)."""
    if TMA:
        h_desc = tl.make_tensor_descriptor(h_ptr, shape=[num_rows, inter], strides=[stride_hr, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[num_experts, hidden, inter], strides=[stride_we, stride_wd, 1],
                                           block_shape=[1, BLOCK_N, BLOCK_K])
    else:
        h_desc, w_desc = h_ptr, w_ptr
    return h_desc, w_desc


@triton.jit
def _block_rows(pid_m, sorted_ptr, num_pairs, BLOCK_M: tl.constexpr):
    """(sorted row offsets, their pair ids, which rows hold a pair) of M block pid_m."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair_m = tl.load(sorted_ptr + offs_m)
    return offs_m, pair_m, pair_m < num_pairs


@triton.jit
def _up_tile(pid_m, pid_n, rows, epi, x_ops, w_ops, h_ops, UP_LOOP: tl.constexpr, STORE_H: tl.constexpr,
             FMT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, TMA: tl.constexpr,
             INTERPRET: tl.constexpr, PREC: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of h (gate and up columns n..n+BN of expert_ids[pid_m]); nothing for a dead block."""
    sorted_ptr, expert_ids_ptr, num_pairs, top_k, inter, hidden = rows
    b_ptr, stride_be, alpha, limit = epi
    expert = tl.load(expert_ids_ptr + pid_m)
    if expert >= 0:
        offs_m, pair_m, row_ok = _block_rows(pid_m, sorted_ptr, num_pairs, BLOCK_M)
        # A rows are gathered from x by pair // K: no permuted copy of the activations (a Hopper TMA box cannot
        # gather, so they stay pointer loads in every format).
        tok_m = (pair_m // top_k).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < inter
        a_ptrs = x_ops[0] + tok_m[:, None] * x_ops[1] + tl.arange(0, BLOCK_K)[None, :]
        acc_g, acc_u = UP_LOOP(a_ptrs, x_ops, w_ops, expert, tok_m, row_ok, offs_n, n_ok, pid_n, inter, hidden,
                               BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, TMA, FMT, INTERPRET, PREC)
        if HAS_BIAS == 2:  # ROW_BIAS: each sorted row's own (kernels/triton_lora_moe.py's pre-activation deltas)
            b_rows = b_ptr + offs_m[:, None].to(tl.int64) * stride_be + offs_n[None, :]
            acc_g += tl.load(b_rows, mask=n_ok[None, :], other=0.0).to(tl.float32)
            acc_u += tl.load(b_rows + inter, mask=n_ok[None, :], other=0.0).to(tl.float32)
        elif HAS_BIAS:
            b_row = b_ptr + expert.to(tl.int64) * stride_be
            acc_g = _add_bias(acc_g, b_row, offs_n, n_ok)
            acc_u = _add_bias(acc_u, b_row + inter, offs_n, n_ok)
        h = activation_epilogue(acc_g, acc_u, alpha, limit, ACT)
        STORE_H(h, offs_m, offs_n, n_ok, pid_n, h_ops, inter, BLOCK_N, FMT, INTERPRET)


@triton.jit
def sorted_up_gemm(rows, num_rows_ptr, num_rows, epi, x_ops, w_ops, h_ops, UP_LOOP: tl.constexpr,
                   STORE_H: tl.constexpr, FMT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                   ACT: tl.constexpr, PERSISTENT: tl.constexpr, TMA: tl.constexpr, INTERPRET: tl.constexpr,
                   PREC: tl.constexpr):
    """The gate-up GEMM's program: its tiles of h. rows = (sorted_ptr, expert_ids_ptr, num_pairs, top_k, I, D),
    epi = (b13_ptr, stride_be, alpha, limit)."""
    num_pid_n = tl.cdiv(rows[4], BLOCK_N)
    if PERSISTENT:
        # The live blocks only (the alignment's padded total, read on the device): no program visits a dead one.
        live_m = tl.load(num_rows_ptr) // BLOCK_M
        for tile in range(tl.program_id(0), live_m * num_pid_n, tl.num_programs(0)):
            pid_m, pid_n = _tile_pids(tile, live_m, num_pid_n, GROUP_M)
            _up_tile(pid_m, pid_n, rows, epi, x_ops, w_ops, h_ops, UP_LOOP, STORE_H, FMT, BLOCK_M, BLOCK_N, BLOCK_K,
                     EVEN_K, HAS_BIAS, ACT, TMA, INTERPRET, PREC)
    else:
        pid_m, pid_n = _grouped_pids(num_rows // BLOCK_M, num_pid_n, GROUP_M)
        _up_tile(pid_m, pid_n, rows, epi, x_ops, w_ops, h_ops, UP_LOOP, STORE_H, FMT, BLOCK_M, BLOCK_N, BLOCK_K,
                 EVEN_K, HAS_BIAS, ACT, TMA, INTERPRET, PREC)


@triton.jit
def _down_tile(pid_m, pid_n, rows, epi, h_ops, w_ops, DOWN_LOOP: tl.constexpr, FMT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
               ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr, TMA: tl.constexpr, INTERPRET: tl.constexpr,
               PREC: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of the routed-weighted down GEMM; nothing for a dead block."""
    sorted_ptr, expert_ids_ptr, num_pairs, top_k, hidden, inter = rows
    b_ptr, stride_be, weights_ptr, y_ptr, stride_yr = epi
    expert = tl.load(expert_ids_ptr + pid_m)
    if expert >= 0:
        offs_m, pair_m, row_ok = _block_rows(pid_m, sorted_ptr, num_pairs, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hidden
        acc = DOWN_LOOP(h_ops, w_ops, expert, offs_m, pid_m, offs_n, n_ok, pid_n, inter, BLOCK_M, BLOCK_N, BLOCK_K,
                        EVEN_K, TMA, FMT, INTERPRET, PREC)
        if HAS_BIAS:  # before the routed weight: it scales the bias too
            acc = _add_bias(acc, b_ptr + expert.to(tl.int64) * stride_be, offs_n, n_ok)
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


@triton.jit
def sorted_down_gemm(rows, num_rows_ptr, num_rows, epi, h_ops, w_ops, DOWN_LOOP: tl.constexpr, FMT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     EVEN_K: tl.constexpr, ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr, PERSISTENT: tl.constexpr,
                     TMA: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    """The down GEMM's program: its tiles of y. rows = (sorted_ptr, expert_ids_ptr, num_pairs, top_k, D, I),
    epi = (b2_ptr, stride_be, weights_ptr, y_ptr, stride_yr)."""
    num_pid_n = tl.cdiv(rows[4], BLOCK_N)
    if PERSISTENT:
        live_m = tl.load(num_rows_ptr) // BLOCK_M
        for tile in range(tl.program_id(0), live_m * num_pid_n, tl.num_programs(0)):
            pid_m, pid_n = _tile_pids(tile, live_m, num_pid_n, GROUP_M)
            _down_tile(pid_m, pid_n, rows, epi, h_ops, w_ops, DOWN_LOOP, FMT, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                       ATOMIC, HAS_BIAS, TMA, INTERPRET, PREC)
    else:
        pid_m, pid_n = _grouped_pids(num_rows // BLOCK_M, num_pid_n, GROUP_M)
        _down_tile(pid_m, pid_n, rows, epi, h_ops, w_ops, DOWN_LOOP, FMT, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                   ATOMIC, HAS_BIAS, TMA, INTERPRET, PREC)


@dataclass(frozen=True)
class WeightFormat(ABC):
    """A weight format's host side: what the pipeline (triton_moe.sorted_fused_moe) launches its two kernels (built
    on this scaffold) with. E local experts, I the intermediate size; a subclass adds its weight tensors.

    The pipeline launches a kernel with keyword arguments: its own (the alignment: sorted_ptr, expert_ids_ptr,
    num_rows_ptr, num_pairs, num_rows; the sizes: num_experts, top_k, inter, hidden; the epilogue's: b13_ptr,
    stride_be, alpha, limit for the gate-up GEMM, b2_ptr, stride_be, weights_ptr, y_ptr, stride_yr for the down
    GEMM; the scaffold's constexprs) and the format's (`up_launch` / `down_launch`: its tensors, strides and
    constexprs, which say whether TMA runs and may override the scaffold's), so each kernel orders its parameters
    as it likes. (Their order is not cosmetic: ptxas allocated 14 more registers to a persistent TMA gate-up
    kernel whose parameters came in another order, for the same PTX.) The defaults here are those of formats whose
    GEMMs take the activations in their float dtype (W16A16, W4A16): A is x itself and h is [R, I] in x's dtype."""

    num_experts: int
    inter: int

    def gemms(self, cfg: MoELaunchConfig) -> tuple[GemmConfig, GemmConfig]:
        """The gate-up and down GEMMs' configs as launched (blocks fitted to the format): the config's."""
        return cfg.up, cfg.down

    def activations(self, x_TD: torch.Tensor) -> tuple:
        """The gate-up GEMM's A operand tensors, made from x (the x_ops tensors)."""
        return (x_TD,)

    def hidden(self, rows: int, x_TD: torch.Tensor) -> tuple:
        """The buffers of h [rows, I] in sorted row order, as the down GEMM reads them (the h_ops tensors)."""
        return (common.workspace((rows, self.inter), x_TD.dtype, x_TD.device),)

    @abstractmethod
    def up_launch(self, g: GemmConfig, a: tuple, h: tuple) -> tuple[triton.JITFunction, dict]:
        """(gate-up kernel, its format keyword arguments and constexprs)."""

    @abstractmethod
    def down_launch(self, g: GemmConfig, h: tuple) -> tuple[triton.JITFunction, dict]:
        """(down kernel, its format keyword arguments and constexprs)."""
