"""The short causal convolution of gated DeltaNet (kernels/causal_conv1d.py is the contract): prefill over a packed
varlen batch, and decode / speculative verify.

Legend: T tokens, S sequences, P state-pool slots, C channels, W kernel width, R = W - 1 state rows, Q intermediate
states kept per sequence; BT tokens and BC channels per program, BR = R rounded up to a power of two.

Prefill, two launches: grid (T / BT, C / BC) computes the outputs, each token finding its sequence by a binary search
of query_start_loc (no host lengths) and reading inputs before its sequence's first token from the slot's conv state;
then grid (S, C / BC) writes each sequence's last R inputs to its slot. Two launches because a slot's old state
must be read by every token block that needs it before it is overwritten.
Decode / verify, one launch: grid (S, C / BC), a program runs its sequence's tokens BT at a time, then writes the
state (or each token's state to the caller's buffer): only it reads or writes that slot's channels.
Replay after a verify step: the prefill's state-write kernel over each sequence's accepted tokens.

Numerics: the sum over the W taps in fp32 (bias first, then taps oldest first), SiLU in fp32, one rounding to the
activations' dtype; the reference rounds once too, but F.conv1d may sum the taps in another order (an ulp of fp32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .causal_conv1d import check_conv_args, check_replay_args
from .triton_gated_delta import launch_config


@triton.jit
def _inputs_at(x_ptr, pool_ptr, u, rel, ok, slot, read, c, c_ok, stride_xt, num_ch, R: tl.constexpr):
    """fp32 [rows, BC]: the input at global token index u (rel = its position in the sequence), read from x for
    rel >= 0 and from the slot's state row R + rel before the sequence's first token (zeros unless `read`)."""
    from_x = ok & (rel >= 0)
    xv = tl.load(x_ptr + u[:, None] * stride_xt + c[None, :], mask=from_x[:, None] & c_ok[None, :], other=0.0)
    from_s = ok & (rel < 0) & read
    srow = (slot * R + R + rel) * num_ch
    sv = tl.load(pool_ptr + srow[:, None] + c[None, :], mask=from_s[:, None] & c_ok[None, :], other=0.0)
    return xv.to(tl.float32) + sv.to(tl.float32)


@triton.jit
def _conv_rows(x_ptr, w_ptr, b_ptr, pool_ptr, t, t_ok, start, slot, read, c, c_ok, stride_xt, stride_wc, num_ch,
               R: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    """fp32 [BT, BC]: act(bias + sum_w weight[:, w] x_{t - R + w}) for tokens t (vectors start/slot/read: per row)."""
    acc = tl.zeros([t.shape[0], c.shape[0]], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    for w in tl.static_range(R + 1):
        xin = _inputs_at(x_ptr, pool_ptr, t - R + w, t - start - R + w, t_ok, slot, read, c, c_ok, stride_xt, num_ch, R)
        wv = tl.load(w_ptr + c * stride_wc + w, mask=c_ok, other=0.0).to(tl.float32)
        acc += xin * wv[None, :]
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    return acc


@triton.jit
def _write_history(x_ptr, pool_ptr, dst_ptr, end, start, slot, read, c, c_ok, stride_xt, num_ch,
                   R: tl.constexpr, BR: tl.constexpr, INTERPRET: tl.constexpr):
    """dst [R, BC] (row stride num_ch) = the R inputs before global index `end` (history rows where the sequence is
    shorter than R): all loaded before any is stored, dst may be the slot itself."""
    r = tl.arange(0, BR)
    r_ok = r < R
    zero = tl.zeros([BR], dtype=tl.int64)
    u = end - R + r
    rows = _inputs_at(x_ptr, pool_ptr, u, u - start, r_ok, zero + slot, read, c, c_ok, stride_xt, num_ch, R)
    tl.store(dst_ptr + r[:, None] * num_ch + c[None, :], common.cast(rows, dst_ptr.dtype.element_ty, INTERPRET),
             mask=r_ok[:, None] & c_ok[None, :])


@triton.jit
def _seq_program(qsl_ptr, num_ch, BC: tl.constexpr):
    """A program of grid (S, C / BC): (its sequence s, its channels c, c_ok = c < num_ch, the sequence's tokens
    [start, end))."""
    s = tl.program_id(0)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    c_ok = c < num_ch
    start = tl.load(qsl_ptr + s).to(tl.int64)
    end = tl.load(qsl_ptr + s + 1).to(tl.int64)
    return s, c, c_ok, start, end


@triton.jit
def _conv_varlen_kernel(x_ptr, w_ptr, b_ptr, pool_ptr, y_ptr, qsl_ptr, slot_ptr, init_ptr, num_tokens, num_seqs,
                        search_steps, stride_xt, stride_wc, num_ch, R: tl.constexpr, HAS_BIAS: tl.constexpr,
                        HAS_INIT: tl.constexpr, SILU: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                        INTERPRET: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    t_ok = t < num_tokens
    c_ok = c < num_ch
    # Each token's sequence: the last s with query_start_loc[s] <= t (empty sequences repeat an entry).
    lo = tl.zeros([BT], dtype=tl.int32)
    hi = lo + num_seqs - 1
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        below = tl.load(qsl_ptr + mid, mask=t_ok, other=0).to(tl.int64) <= t
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid - 1)
    start = tl.load(qsl_ptr + lo, mask=t_ok, other=0).to(tl.int64)
    slot = tl.load(slot_ptr + lo, mask=t_ok, other=-1).to(tl.int64)
    read = slot >= 0
    if HAS_INIT:
        read = read & (tl.load(init_ptr + lo, mask=t_ok, other=0) != 0)
    y = _conv_rows(x_ptr, w_ptr, b_ptr, pool_ptr, t, t_ok, start, slot, read, c, c_ok, stride_xt, stride_wc, num_ch,
                   R, HAS_BIAS, SILU)
    tl.store(y_ptr + t[:, None] * num_ch + c[None, :], common.cast(y, y_ptr.dtype.element_ty, INTERPRET),
             mask=t_ok[:, None] & c_ok[None, :])


@triton.jit
def _conv_state_kernel(x_ptr, pool_ptr, qsl_ptr, slot_ptr, init_ptr, acc_ptr, stride_xt, num_ch, R: tl.constexpr,
                       BR: tl.constexpr, HAS_INIT: tl.constexpr, REPLAY: tl.constexpr, BC: tl.constexpr,
                       INTERPRET: tl.constexpr):
    s, c, c_ok, start, end = _seq_program(qsl_ptr, num_ch, BC)
    if REPLAY:  # the accepted tokens only
        end = tl.minimum(end, start + tl.maximum(tl.load(acc_ptr + s).to(tl.int64), 0))
    slot = tl.load(slot_ptr + s).to(tl.int64)
    if slot >= 0:
        read = tl.full([BR], 1, tl.int1)
        if HAS_INIT:
            read = read & (tl.load(init_ptr + s + tl.zeros([BR], dtype=tl.int32)) != 0)
        _write_history(x_ptr, pool_ptr, pool_ptr + slot * R * num_ch, end, start, slot, read, c, c_ok, stride_xt,
                       num_ch, R, BR, INTERPRET)


@triton.jit
def _conv_update_kernel(x_ptr, w_ptr, b_ptr, pool_ptr, y_ptr, inter_ptr, qsl_ptr, slot_ptr, keep, stride_xt,
                        stride_wc, num_ch, R: tl.constexpr, BR: tl.constexpr, HAS_BIAS: tl.constexpr,
                        SILU: tl.constexpr, KEEP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                        INTERPRET: tl.constexpr):
    s, c, c_ok, start, end = _seq_program(qsl_ptr, num_ch, BC)
    slot = tl.load(slot_ptr + s).to(tl.int64)
    zero = tl.zeros([BT], dtype=tl.int64)
    read = (zero + slot) >= 0
    for j0 in range(0, end - start, BT):
        j = j0 + tl.arange(0, BT)
        t = start + j
        t_ok = t < end
        y = _conv_rows(x_ptr, w_ptr, b_ptr, pool_ptr, t, t_ok, zero + start, zero + slot, read, c, c_ok, stride_xt,
                       stride_wc, num_ch, R, HAS_BIAS, SILU)
        tl.store(y_ptr + t[:, None] * num_ch + c[None, :], common.cast(y, y_ptr.dtype.element_ty, INTERPRET),
                 mask=t_ok[:, None] & c_ok[None, :])
        if KEEP:  # the state after token j: its last R inputs, row r = input j - R + 1 + r
            kept = t_ok & (j < keep)
            for r in tl.static_range(R):
                xin = _inputs_at(x_ptr, pool_ptr, t - R + 1 + r, j - R + 1 + r, kept, zero + slot, read, c, c_ok,
                                 stride_xt, num_ch, R)
                dst = ((s.to(tl.int64) * keep + j) * R + r) * num_ch
                tl.store(inter_ptr + dst[:, None] + c[None, :], common.cast(xin, inter_ptr.dtype.element_ty, INTERPRET),
                         mask=kept[:, None] & c_ok[None, :])
    if not KEEP:
        if slot >= 0:
            _write_history(x_ptr, pool_ptr, pool_ptr + slot * R * num_ch, end, start, slot,
                           tl.full([BR], 1, tl.int1), c, c_ok, stride_xt, num_ch, R, BR, INTERPRET)


def _prepare_x(x_TC, conv_state_pool_PRC):
    """x_TC with a unit last stride, after the dtype checks every launch here makes (the pool: contiguous, x's dtype)."""
    common.check_dtype("x_TC", x_TC)
    if conv_state_pool_PRC.dtype != x_TC.dtype or not conv_state_pool_PRC.is_contiguous():
        raise ValueError(f"conv_state_pool_PRC ({conv_state_pool_PRC.dtype}) must be contiguous and of x_TC's dtype "
                         f"({x_TC.dtype}).")
    return x_TC if x_TC.stride(-1) == 1 else x_TC.contiguous()


def _prepare(x_TC, weight_CW, bias_C, conv_state_pool_PRC, out):
    x_TC = _prepare_x(x_TC, conv_state_pool_PRC)
    weight_CW = weight_CW if weight_CW.stride(-1) == 1 else weight_CW.contiguous()
    out = common.out_buffer(out, "out", tuple(x_TC.shape), x_TC.dtype, x_TC.device)
    return x_TC, weight_CW, out


def triton_causal_conv1d(
    x_TC: torch.Tensor, weight_CW: torch.Tensor, bias_C: torch.Tensor | None, conv_state_pool_PRC: torch.Tensor,
    query_start_loc_S1: torch.Tensor, slot_ids_S: torch.Tensor, has_initial_state_S: torch.Tensor | None = None,
    activation: str | None = "silu", *, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `reference_causal_conv1d`, two launches, no host sync; x may be a strided row view (unit
    last stride); the pool must be contiguous, of x's dtype."""
    T, S, C, W = check_conv_args(x_TC, weight_CW, bias_C, conv_state_pool_PRC, query_start_loc_S1, slot_ids_S,
                                 has_initial_state_S, activation)
    x_TC, weight_CW, out = _prepare(x_TC, weight_CW, bias_C, conv_state_pool_PRC, out)
    if S == 0:
        return out
    cfg = launch_config("conv", x_TC)
    BT, BC = cfg["BLOCK_T"], min(cfg["BLOCK_C"], triton.next_power_of_2(C))
    interp = common.interpreting(x_TC)
    init = has_initial_state_S if has_initial_state_S is not None else slot_ids_S
    if T:
        _conv_varlen_kernel[(triton.cdiv(T, BT), triton.cdiv(C, BC))](
            x_TC, weight_CW, bias_C if bias_C is not None else weight_CW, conv_state_pool_PRC, out, query_start_loc_S1,
            slot_ids_S, init, T, S, max(S - 1, 1).bit_length(), x_TC.stride(0), weight_CW.stride(0), C, R=W - 1,
            HAS_BIAS=bias_C is not None, HAS_INIT=has_initial_state_S is not None, SILU=activation == "silu",
            BT=BT, BC=BC, INTERPRET=interp, num_warps=cfg["num_warps"])
    _conv_state_kernel[(S, triton.cdiv(C, BC))](
        x_TC, conv_state_pool_PRC, query_start_loc_S1, slot_ids_S, init, init, x_TC.stride(0), C, R=W - 1,
        BR=triton.next_power_of_2(W - 1), HAS_INIT=has_initial_state_S is not None, REPLAY=False, BC=BC,
        INTERPRET=interp, num_warps=cfg["num_warps"])
    return out


def triton_causal_conv1d_update(
    x_TC: torch.Tensor, weight_CW: torch.Tensor, bias_C: torch.Tensor | None, conv_state_pool_PRC: torch.Tensor,
    query_start_loc_S1: torch.Tensor, slot_ids_S: torch.Tensor, activation: str | None = "silu",
    intermediate_states_SQRC: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `reference_causal_conv1d_update`, one launch, no host sync (CUDA-graph safe)."""
    T, S, C, W = check_conv_args(x_TC, weight_CW, bias_C, conv_state_pool_PRC, query_start_loc_S1, slot_ids_S, None,
                                 activation, intermediate_states_SQRC)
    x_TC, weight_CW, out = _prepare(x_TC, weight_CW, bias_C, conv_state_pool_PRC, out)
    if intermediate_states_SQRC is not None and not intermediate_states_SQRC.is_contiguous():
        raise ValueError("intermediate_states_SQRC must be contiguous.")
    if S == 0:
        return out
    cfg = launch_config("conv_update", x_TC)
    BC = min(cfg["BLOCK_C"], triton.next_power_of_2(C))
    keep = intermediate_states_SQRC.shape[1] if intermediate_states_SQRC is not None else 0
    _conv_update_kernel[(S, triton.cdiv(C, BC))](
        x_TC, weight_CW, bias_C if bias_C is not None else weight_CW, conv_state_pool_PRC, out,
        intermediate_states_SQRC if keep else conv_state_pool_PRC, query_start_loc_S1, slot_ids_S, keep,
        x_TC.stride(0), weight_CW.stride(0), C, R=W - 1, BR=triton.next_power_of_2(W - 1),
        HAS_BIAS=bias_C is not None, SILU=activation == "silu", KEEP=intermediate_states_SQRC is not None,
        BT=cfg["BLOCK_T"], BC=BC, INTERPRET=common.interpreting(x_TC), num_warps=cfg["num_warps"])
    return out


def triton_replay_conv_state(x_TC: torch.Tensor, conv_state_pool_PRC: torch.Tensor, query_start_loc_S1: torch.Tensor,
                             slot_ids_S: torch.Tensor, num_accepted_S: torch.Tensor) -> None:
    """Same contract as `reference_replay_conv_state`, one launch, no host sync."""
    S = check_replay_args(x_TC, conv_state_pool_PRC, query_start_loc_S1, slot_ids_S, num_accepted_S)
    x_TC = _prepare_x(x_TC, conv_state_pool_PRC)
    if S == 0:
        return
    R, C = conv_state_pool_PRC.shape[1:]
    cfg = launch_config("conv_update", x_TC)
    BC = min(cfg["BLOCK_C"], triton.next_power_of_2(C))
    _conv_state_kernel[(S, triton.cdiv(C, BC))](
        x_TC, conv_state_pool_PRC, query_start_loc_S1, slot_ids_S, slot_ids_S, num_accepted_S, x_TC.stride(0), C,
        R=R, BR=triton.next_power_of_2(R), HAS_INIT=False, REPLAY=True, BC=BC, INTERPRET=common.interpreting(x_TC),
        num_warps=cfg["num_warps"])
