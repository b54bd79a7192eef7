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
from .norm import FUSED_MAX_TOKENS
from .triton_common import cast
from .triton_gemv import check_weight, checked_counters, gemv_block_arrive, launch_shape, normed
from .triton_norm import inverse_rms


@triton.jit
def _add_norm_row(y_row, r_row, nw_ptr, h_row, s_row, D, eps, CHUNK: tl.constexpr, CHUNKS: tl.constexpr,
                  INTERPRET: tl.constexpr):
    """s = y + residual (rounded) and h = norm(s) of one row, in CHUNKS unrolled chunks: s is stored, then (after a
    barrier: other threads read what a thread stored) read back for the norm."""
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
        tl.store(h_row + k, normed(s, inv, tl.load(nw_ptr + k, mask=ok, other=0.0), dt, INTERPRET), mask=ok)


@triton.jit
def _linear_norm_kernel(x_ptr, w_ptr, b_ptr, r_ptr, nw_ptr, y_ptr, h_ptr, s_ptr, cnt_ptr, in_features, D, eps,
                        stride_xt, stride_wn, stride_rt,
                        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        K_TILES: tl.constexpr, ONE_STEP: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr,
                        INTERPRET: tl.constexpr):
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    row = t.to(tl.int64) * D
    arrived = gemv_block_arrive(x_ptr + t.to(tl.int64) * stride_xt, w_ptr, b_ptr, y_ptr + row, cnt_ptr + t, pid_n, D,
                                in_features, stride_wn, HAS_BIAS, BLOCK_N, BLOCK_K, K_TILES, ONE_STEP, INTERPRET)
    if arrived == tl.num_programs(1) - 1:  # the token's last program: its whole row of y is stored
        tl.atomic_xchg(cnt_ptr + t, 0)
        _add_norm_row(y_ptr + row, r_ptr + t.to(tl.int64) * stride_rt, nw_ptr, h_ptr + row, s_ptr + row, D, eps,
                      CHUNK, CHUNKS, INTERPRET)


def token_counters(device) -> torch.Tensor:
    """A layer's per-token counters for FUSED_MAX_TOKENS tokens, zeros: the launch leaves them zero (its last
    programs reset them), so one tensor serves every step and every captured graph of the layer; a layer's
    launches are ordered on its stream."""
    return checked_counters(None, device)


def triton_linear_add_rms_norm(
    x_TK: torch.Tensor, w_DK: torch.Tensor, bias_D: torch.Tensor | None, residual_TD: torch.Tensor,
    norm_D: torch.Tensor, eps: float, counters_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `reference_linear_add_rms_norm`: one launch for up to FUSED_MAX_TOKENS tokens, else the
    linear and add_rms_norm apart. counters_T: the layer's `token_counters` (made here when not given)."""
    common.check_dtype("x_TK", x_TK)
    if x_TK.dim() != 2:
        raise ValueError(f"x_TK has {x_TK.dim()} dims: must be [T, K].")
    T, K = x_TK.shape
    D = w_DK.shape[0]
    check_weight("w_DK", w_DK, (D, K), x_TK.dtype)
    check_weight("residual_TD", residual_TD, (T, D), x_TK.dtype)
    check_weight("norm_D", norm_D, (D,), x_TK.dtype)
    if bias_D is not None:
        check_weight("bias_D", bias_D, (D,), x_TK.dtype)
    if T > FUSED_MAX_TOKENS:
        from .triton_norm import triton_add_rms_norm

        return triton_add_rms_norm(torch.nn.functional.linear(x_TK, w_DK, bias_D), residual_TD, norm_D, eps)
    h_TD = common.workspace((T, D), x_TK.dtype, x_TK.device)
    s_TD = common.workspace((T, D), x_TK.dtype, x_TK.device)
    if T == 0:
        return h_TD, s_TD
    counters_T = checked_counters(counters_T, x_TK.device)
    x_TK = x_TK if x_TK.stride(-1) == 1 else x_TK.contiguous()
    residual_TD = residual_TD if residual_TD.stride(-1) == 1 else residual_TD.contiguous()
    if w_DK.stride(-1) != 1:
        raise ValueError("w_DK must have a unit last stride (a Linear's weight).")
    interp = common.interpreting(x_TK)
    bn, bk, tiles, one_step, warps = launch_shape(D, K, 64, interp, x_TK.device)
    y_TD = common.workspace((T, D), x_TK.dtype, x_TK.device)
    chunk = min(triton.next_power_of_2(D), 64 if interp else 1024)
    _linear_norm_kernel[(T, triton.cdiv(D, bn))](
        x_TK, w_DK, bias_D if bias_D is not None else norm_D, residual_TD, norm_D, y_TD, h_TD, s_TD, counters_T,
        K, D, float(eps), x_TK.stride(0), w_DK.stride(0), residual_TD.stride(0), HAS_BIAS=bias_D is not None,
        BLOCK_N=bn, BLOCK_K=bk, K_TILES=tiles, ONE_STEP=one_step, CHUNK=chunk, CHUNKS=triton.cdiv(D, chunk), INTERPRET=interp,
        num_warps=warps,
    )
    return h_TD, s_TD
