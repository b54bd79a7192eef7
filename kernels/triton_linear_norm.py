"""A decode batch's linear, residual add and RMSNorm in one launch (kernels/norm.py's
reference_linear_add_rms_norm is the contract: F.linear, then add_rms_norm): the attention's o_proj and the norm
before the FFN block, which were a GEMM and a norm launch, the second waiting on the first.

Legend: T tokens, K in features, D out features (the hidden size), BN rows a program.

How, grid (T, D / BN), program (t, n): rows [n BN, (n + 1) BN) of y = x Wᵀ (+ bias) for token t
(kernels/triton_gemv.py: CUDA-core tiles, unrolled loads), rounded into y_TD as a separate linear would have
written them; then the token's last-arriving program (a per-token counter: each program adds one after its rows
are stored, the one that reads D / BN - 1 is last and sets it back to zero, so the counters stay zero between
launches and a CUDA graph replays them) adds the residual, rounded (torch's add), and norms the row exactly as
kernels/triton_norm.py does (the same roundings), writing the sum and the normed row. Its loads of y are
volatile (other programs' stores, released before their atomic add and acquired by it).

Numerics: the sum and the norm are add_rms_norm's bit for bit on the same y; y itself sums each row's products
in the program's fixed order (per token: batch-invariant), an ulp of the activation dtype from cuBLAS at most.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .fp8 import DEFAULT_BLOCK, FP8_DTYPE, fp8_gemv_rows
from .norm import FUSED_MAX_TOKENS
from .triton_common import cast
from .triton_gemv import (check_fp8_gemv_weight, check_weight, checked_counters, fp8_scratch, gemv_block_arrive,
                          launch_shape, normed, quant_chunk, quant_row)
from .triton_norm import inverse_rms


@triton.jit
def _add_norm_row(y_row, r_row, nw_ptr, h_row, s_row, hq_row, hs_row, D, eps, CHUNK: tl.constexpr,
                  CHUNKS: tl.constexpr, QUANT_OUT: tl.constexpr, OUT_GROUP: tl.constexpr, INTERPRET: tl.constexpr):
    """s = y + residual (rounded) and h = norm(s) of one row, in CHUNKS unrolled chunks: s is stored, then (after a
    barrier: other threads read what a thread stored) read back for the norm. QUANT_OUT: h also quantized per
    OUT_GROUP columns (CHUNK a multiple of it) into hq_row / hs_row, the FP8 experts' input (moe/fp8_input.py)."""
    dt = y_row.dtype.element_ty
    offs = tl.arange(0, CHUNK)
    ssq_k = tl.zeros([CHUNK], dtype=tl.float32)
    for c in tl.static_range(CHUNKS):
        k = c * CHUNK + offs
        ok = k < D
        y = tl.load(y_row + k, mask=ok, other=0.0, volatile=True)
        r = tl.load(r_row + k, mask=ok, other=0.0)
        s = cast(y.to(tl.float32) + r.to(tl.float32), dt, INTERPRET)
        tl.store(s_row + k, s, mask=ok)
        s32 = s.to(tl.float32)
        ssq_k += s32 * s32
    inv = inverse_rms(tl.sum(ssq_k, axis=0), D, eps)
    tl.debug_barrier()
    for c in tl.static_range(CHUNKS):
        k = c * CHUNK + offs
        ok = k < D
        s = tl.load(s_row + k, mask=ok, other=0.0)
        h = normed(s, inv, tl.load(nw_ptr + k, mask=ok, other=0.0), dt, INTERPRET)
        tl.store(h_row + k, h, mask=ok)
        if QUANT_OUT:
            quant_chunk(h, hq_row, hs_row, c * CHUNK, D, CHUNK, OUT_GROUP, INTERPRET)


@triton.jit
def _linear_norm_kernel(x_ptr, w_ptr, b_ptr, r_ptr, nw_ptr, y_ptr, h_ptr, s_ptr, cnt_ptr, in_features, D, eps,
                        stride_xt, stride_wn, stride_rt, xq_ptr, xs_ptr, ws_ptr, stride_ws, scale_rows, num_groups,
                        hq_ptr, hs_ptr, out_groups,
                        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        K_TILES: tl.constexpr, ONE_STEP: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr,
                        FP8_W: tl.constexpr, GROUP: tl.constexpr, QCHUNK: tl.constexpr, QCHUNKS: tl.constexpr,
                        QUANT_OUT: tl.constexpr, OUT_GROUP: tl.constexpr, INTERPRET: tl.constexpr):
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    row = t.to(tl.int64) * D
    x_row = x_ptr + t.to(tl.int64) * stride_xt
    xs_row = xs_ptr + t.to(tl.int64) * num_groups
    if FP8_W:  # W8A8: the token's input quantized per group by every program of it (the same bytes)
        xq_row = xq_ptr + t.to(tl.int64) * in_features
        quant_row(x_row, xq_row, xs_row, in_features, QCHUNK, QCHUNKS, GROUP, INTERPRET)
        x_row = xq_row
    arrived = gemv_block_arrive(x_row, w_ptr, b_ptr, y_ptr + row, cnt_ptr + t, pid_n, D, in_features, stride_wn,
                                xs_row, ws_ptr, stride_ws, scale_rows, HAS_BIAS, BLOCK_N, BLOCK_K, K_TILES, ONE_STEP,
                                FP8_W, GROUP, INTERPRET)
    if arrived == tl.num_programs(1) - 1:  # the token's last program: its whole row of y is stored
        tl.atomic_xchg(cnt_ptr + t, 0)
        _add_norm_row(y_ptr + row, r_ptr + t.to(tl.int64) * stride_rt, nw_ptr, h_ptr + row, s_ptr + row,
                      hq_ptr + row, hs_ptr + t.to(tl.int64) * out_groups, D, eps, CHUNK, CHUNKS, QUANT_OUT, OUT_GROUP,
                      INTERPRET)


def token_counters(device) -> torch.Tensor:
    """A layer's per-token counters for FUSED_MAX_TOKENS tokens, zeros: the launch leaves them zero (its last
    programs reset them), so one tensor serves every step and every captured graph of the layer; a layer's
    launches are ordered on its stream."""
    return checked_counters(None, device)


def triton_linear_add_rms_norm(
    x_TK: torch.Tensor, w_DK: torch.Tensor, bias_D: torch.Tensor | None, residual_TD: torch.Tensor,
    norm_D: torch.Tensor, eps: float, counters_T: torch.Tensor | None = None, *,
    w_scale_inv: torch.Tensor | None = None, block: tuple[int, int] = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `reference_linear_add_rms_norm`: one launch for up to FUSED_MAX_TOKENS tokens, else the
    linear and add_rms_norm apart. counters_T: the layer's `token_counters` (made here when not given).
    w_scale_inv: w_DK is an FP8 weight (e4m3, these block scales in `block`), W8A8 as triton_fp8_linear."""
    h_TD, s_TD, _, _ = _launch(x_TK, w_DK, bias_D, residual_TD, norm_D, eps, counters_T, w_scale_inv, block, None)
    return h_TD, s_TD


def triton_linear_add_rms_norm_fp8(
    x_TK: torch.Tensor, w_DK: torch.Tensor, bias_D: torch.Tensor | None, residual_TD: torch.Tensor,
    norm_D: torch.Tensor, eps: float, group: int = 128, counters_T: torch.Tensor | None = None, *,
    w_scale_inv: torch.Tensor | None = None, block: tuple[int, int] = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as `reference_linear_add_rms_norm_fp8`: triton_linear_add_rms_norm, and its normed output
    quantized per token and `group` (a power of two: the FP8 experts' Bk) channels by the token's last program in
    the same launch (triton_add_rms_norm_fp8 past FUSED_MAX_TOKENS): (h, sum, hq e4m3 [T, D], hs float32 [T, G])."""
    if group <= 0 or group & (group - 1):
        raise ValueError(f"group={group} is invalid: a power of two (the experts' Bk, 128).")
    h_TD, s_TD, hq, hs = _launch(x_TK, w_DK, bias_D, residual_TD, norm_D, eps, counters_T, w_scale_inv, block, group)
    assert hq is not None and hs is not None  # group given
    return h_TD, s_TD, hq, hs


def _launch(x_TK, w_DK, bias_D, residual_TD, norm_D, eps, counters_T, w_scale_inv, block, out_group):
    """(h, sum, hq, hs): the arguments checked, one launch for a decode batch, else the linear and the norm apart;
    hq and hs (h quantized per `out_group` channels) None where out_group is."""
    common.check_dtype("x_TK", x_TK)
    if x_TK.dim() != 2:
        raise ValueError(f"x_TK has {x_TK.dim()} dims: must be [T, K].")
    T, K = x_TK.shape
    D = w_DK.shape[0]
    if w_scale_inv is None:
        check_weight("w_DK", w_DK, (D, K), x_TK.dtype)
    else:
        block = check_fp8_gemv_weight("w_DK", w_DK, w_scale_inv, (D, K), block)
    check_weight("residual_TD", residual_TD, (T, D), x_TK.dtype)
    check_weight("norm_D", norm_D, (D,), x_TK.dtype)
    if bias_D is not None:
        check_weight("bias_D", bias_D, (D,), x_TK.dtype)
    widest = 64 if w_scale_inv is None else fp8_gemv_rows(64, block)
    if T > FUSED_MAX_TOKENS or widest < 8:
        return _unfused(x_TK, w_DK, bias_D, residual_TD, norm_D, eps, w_scale_inv, block, out_group)
    h_TD = common.workspace((T, D), x_TK.dtype, x_TK.device)
    s_TD = common.workspace((T, D), x_TK.dtype, x_TK.device)
    quant_out = out_group is not None
    out_groups = triton.cdiv(D, out_group) if quant_out else 0
    hq = common.workspace((T, D), FP8_DTYPE, x_TK.device) if quant_out else None
    hs = common.workspace((T, out_groups), torch.float32, x_TK.device) if quant_out else None
    if T == 0:
        return h_TD, s_TD, hq, hs
    counters_T = checked_counters(counters_T, x_TK.device)
    x_TK = x_TK if x_TK.stride(-1) == 1 else x_TK.contiguous()
    residual_TD = residual_TD if residual_TD.stride(-1) == 1 else residual_TD.contiguous()
    if w_DK.stride(-1) != 1:
        raise ValueError("w_DK must have a unit last stride (a Linear's weight).")
    interp = common.interpreting(x_TK)
    fp8 = w_scale_inv is not None
    group = block[1] if fp8 else None
    bn, bk, tiles, one_step, warps = launch_shape(D, K, widest, interp, x_TK.device, itemsize=w_DK.element_size())
    y_TD = common.workspace((T, D), x_TK.dtype, x_TK.device)
    chunk = max(min(triton.next_power_of_2(D), 64 if interp else 1024), out_group or 1)  # whole output groups
    fp8_args = fp8_scratch(x_TK, w_scale_inv, block, interp)
    _linear_norm_kernel[(T, triton.cdiv(D, bn))](
        x_TK, w_DK, bias_D if bias_D is not None else norm_D, residual_TD, norm_D, y_TD, h_TD, s_TD, counters_T,
        K, D, float(eps), x_TK.stride(0), w_DK.stride(0), residual_TD.stride(0), *fp8_args[:-2],
        hq if hq is not None else h_TD, hs if hs is not None else h_TD, out_groups,
        HAS_BIAS=bias_D is not None, BLOCK_N=bn, BLOCK_K=bk, K_TILES=tiles, ONE_STEP=one_step, CHUNK=chunk,
        CHUNKS=triton.cdiv(D, chunk), FP8_W=fp8, GROUP=group or 1, QCHUNK=fp8_args[-2], QCHUNKS=fp8_args[-1],
        QUANT_OUT=quant_out, OUT_GROUP=out_group or 1, INTERPRET=interp, num_warps=warps,
    )
    return h_TD, s_TD, hq, hs


def _unfused(x_TK, w_DK, bias_D, residual_TD, norm_D, eps, w_scale_inv, block, out_group):
    """The linear (float or W8A8), then the add + norm launch (quantizing its output where out_group is given)."""
    from .triton_norm import triton_add_rms_norm, triton_add_rms_norm_fp8

    if w_scale_inv is None:
        y_TD = torch.nn.functional.linear(x_TK, w_DK, bias_D)
    else:
        from .triton_fp8 import triton_fp8_linear

        y_TD = triton_fp8_linear(x_TK, w_DK, w_scale_inv, block, bias_D)
    if out_group is None:
        return (*triton_add_rms_norm(y_TD, residual_TD, norm_D, eps), None, None)
    return triton_add_rms_norm_fp8(y_TD, residual_TD, norm_D, eps, out_group)
