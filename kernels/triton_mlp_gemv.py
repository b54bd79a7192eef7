"""The dense MLP's decode GEMVs (kernels/mlp_gemv.py is the contract): gate-up with SiLU·up in its epilogue, and down
with the addend in its epilogue, one launch each for up to FUSED_MAX_TOKENS tokens (kernels/norm.py); past that
the GEMM (or the FP8 GEMM) and the separate ops.

Legend: T tokens, K in features, I intermediate size, U the up rows' first row, N out features, BN rows a program.

How: grid (T, I / BN) (gate-up) or (T, N / BN) (down), program (t, n): kernels/triton_gemv.py's row-block GEMV
(`gemv_rows`: CUDA-core tiles, unrolled loads; FP8 weights W8A8, the token's row quantized per group by each
program as the attention launches do). Gate-up takes a program's BN gate rows and the BN up rows paired with them
(the same walk from row U + n BN), rounds both to the activations' dtype as the GEMM's output would be, and stores
triton_silu_mul's arithmetic of them (`silu_mul_values`). Down rounds its rows likewise and adds the addend,
rounded once more as torch's add. No program waits on another: the epilogues are row-wise. Gate-up's two walks share launch_shape's 32 kB budget a
walk, so a straight-line program holds up to 64 kB of loads; the largest such case compiled (DeepSeek-V2-Lite's
shared experts, 2 x 32 kB) takes 193 registers and no spills (compile_tiny --cases fused): the compile report is
the check for a new shape.

Numerics: the epilogues are the unfused kernels' bits on the same GEMV outputs; the GEMVs sum in their own fixed
order (batch-invariant: the launch shape is the weight's alone), within an ulp of the activation dtype of cuBLAS.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .fp8 import DEFAULT_BLOCK, fp8_gemv_rows
from .norm import FUSED_MAX_TOKENS
from .triton_common import cast
from .triton_gemv import check_fp8_gemv_weight, check_weight, fp8_scratch, gemv_rows, launch_shape, quant_row
from .triton_silu_mul import silu_mul_values


@triton.jit
def _program_rows(x_ptr, xq_ptr, xs_ptr, in_features, rows, stride_xt, num_groups, BLOCK_N: tl.constexpr,
                  FP8_W: tl.constexpr, GROUP: tl.constexpr, QCHUNK: tl.constexpr, QCHUNKS: tl.constexpr,
                  INTERPRET: tl.constexpr):
    """Program (t, n)'s part: (t, the row the GEMV reads: x's, or (FP8_W) its quantization made by this program,
    its group scales' row, the first row n BN, the rows [BN], their mask against `rows`)."""
    t = tl.program_id(0)
    row0 = tl.program_id(1) * BLOCK_N
    x_row = x_ptr + t.to(tl.int64) * stride_xt
    xs_row = xs_ptr + t.to(tl.int64) * num_groups
    if FP8_W:
        xq_row = xq_ptr + t.to(tl.int64) * in_features
        quant_row(x_row, xq_row, xs_row, in_features, QCHUNK, QCHUNKS, GROUP, INTERPRET)
        x_row = xq_row
    offs_n = row0 + tl.arange(0, BLOCK_N)
    return t, x_row, xs_row, row0, offs_n, offs_n < rows


@triton.jit
def _mlp_gate_up_kernel(x_ptr, w_ptr, h_ptr, xq_ptr, xs_ptr, ws_ptr, in_features, inter, up_row, stride_xt,
                        stride_wn, stride_ws, scale_rows, num_groups, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        K_TILES: tl.constexpr, ONE_STEP: tl.constexpr, FP8_W: tl.constexpr, GROUP: tl.constexpr,
                        QCHUNK: tl.constexpr, QCHUNKS: tl.constexpr, INTERPRET: tl.constexpr):
    t, x_row, xs_row, row0, offs_n, n_ok = _program_rows(x_ptr, xq_ptr, xs_ptr, in_features, inter, stride_xt,
                                                         num_groups, BLOCK_N, FP8_W, GROUP, QCHUNK, QCHUNKS, INTERPRET)
    g = gemv_rows(x_row, w_ptr, offs_n, n_ok, row0, in_features, stride_wn, xs_row, ws_ptr, stride_ws, scale_rows,
                  BLOCK_N, BLOCK_K, K_TILES, ONE_STEP, FP8_W, GROUP)
    u = gemv_rows(x_row, w_ptr, up_row + offs_n, n_ok, up_row + row0, in_features, stride_wn, xs_row, ws_ptr,
                  stride_ws, scale_rows, BLOCK_N, BLOCK_K, K_TILES, ONE_STEP, FP8_W, GROUP)
    dt = h_ptr.dtype.element_ty
    g = cast(g, dt, INTERPRET).to(tl.float32)  # the GEMM's output, as silu_mul would read it
    u = cast(u, dt, INTERPRET).to(tl.float32)
    tl.store(h_ptr + t.to(tl.int64) * inter + offs_n, silu_mul_values(g, u, dt, INTERPRET), mask=n_ok)


@triton.jit
def _mlp_down_kernel(x_ptr, w_ptr, a_ptr, y_ptr, xq_ptr, xs_ptr, ws_ptr, in_features, rows, stride_xt, stride_wn,
                     stride_at, stride_ws, scale_rows, num_groups, HAS_ADD: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, K_TILES: tl.constexpr, ONE_STEP: tl.constexpr, FP8_W: tl.constexpr,
                     GROUP: tl.constexpr, QCHUNK: tl.constexpr, QCHUNKS: tl.constexpr, INTERPRET: tl.constexpr):
    t, x_row, xs_row, row0, offs_n, n_ok = _program_rows(x_ptr, xq_ptr, xs_ptr, in_features, rows, stride_xt,
                                                         num_groups, BLOCK_N, FP8_W, GROUP, QCHUNK, QCHUNKS, INTERPRET)
    y = gemv_rows(x_row, w_ptr, offs_n, n_ok, row0, in_features, stride_wn, xs_row, ws_ptr, stride_ws, scale_rows,
                  BLOCK_N, BLOCK_K, K_TILES, ONE_STEP, FP8_W, GROUP)
    dt = y_ptr.dtype.element_ty
    y = cast(y, dt, INTERPRET)
    if HAS_ADD:  # torch's add of the rounded linear output: one more rounding
        a = tl.load(a_ptr + t.to(tl.int64) * stride_at + offs_n, mask=n_ok, other=0.0)
        y = cast(y.to(tl.float32) + a.to(tl.float32), dt, INTERPRET)
    tl.store(y_ptr + t.to(tl.int64) * rows + offs_n, y, mask=n_ok)


def _checked(x_TK, w_NK, rows, w_scale_inv, block, name) -> tuple[tuple[int, int], int]:
    """(the FP8 block, the widest rows a program) of the weight, checked; widest < 8: unfused."""
    common.check_dtype("x_TK", x_TK)
    if x_TK.dim() != 2:
        raise ValueError(f"x_TK has {x_TK.dim()} dims: must be [T, K].")
    if w_scale_inv is None:
        check_weight(name, w_NK, (rows, x_TK.shape[1]), x_TK.dtype)
        return block, 64
    block = check_fp8_gemv_weight(name, w_NK, w_scale_inv, (rows, x_TK.shape[1]), block)
    return block, fp8_gemv_rows(64, block)


def _linear(x_TK, w_NK, w_scale_inv, block):
    if w_scale_inv is None:
        return torch.nn.functional.linear(x_TK, w_NK)
    from .triton_fp8 import triton_fp8_linear

    return triton_fp8_linear(x_TK, w_NK, w_scale_inv, block)


def _prepared(x_TK, w_NK, name, rows, widest, w_scale_inv, block):
    """(x with a unit last stride, interpreting, launch_shape's tuple, fp8_scratch's tuple) of a launch; the weight
    must have a unit last stride."""
    x_TK = x_TK if x_TK.stride(-1) == 1 else x_TK.contiguous()
    if w_NK.stride(-1) != 1:
        raise ValueError(f"{name} must have a unit last stride (a Linear's weight).")
    interp = common.interpreting(x_TK)
    return x_TK, interp, launch_shape(rows, x_TK.shape[1], widest, interp, x_TK.device,
                                      itemsize=w_NK.element_size()), fp8_scratch(x_TK, w_scale_inv, block, interp)


def triton_gate_up_silu_mul(x_TK: torch.Tensor, w_FK: torch.Tensor, inter: int, up_row: int, *,
                            w_scale_inv: torch.Tensor | None = None,
                            block: tuple[int, int] = DEFAULT_BLOCK) -> torch.Tensor:
    """Same contract as `reference_gate_up_silu_mul`: one launch for a decode batch, else the linear and
    triton_silu_mul."""
    block, widest = _checked(x_TK, w_FK, w_FK.shape[0], w_scale_inv, block, "w_FK")
    if not 0 < inter <= up_row or up_row + inter > w_FK.shape[0]:
        raise ValueError(f"inter={inter}, up_row={up_row} do not fit a gate-up weight of {w_FK.shape[0]} rows: gate "
                         "rows [0, inter), up rows [up_row, up_row + inter), up_row >= inter.")
    T, K = x_TK.shape
    # FP8: the up rows' programs must start on a scale row too (up_row a multiple of Bn: the stack's own layout).
    fits = widest >= 8 and (w_scale_inv is None or up_row % block[0] == 0)
    if T > FUSED_MAX_TOKENS or not fits:
        from .triton_silu_mul import triton_silu_mul

        y_TF = _linear(x_TK, w_FK, w_scale_inv, block)
        return triton_silu_mul(y_TF[:, :inter], y_TF[:, up_row:up_row + inter])
    h_TI = common.workspace((T, inter), x_TK.dtype, x_TK.device)
    if T == 0:
        return h_TI
    x_TK, interp, (bn, bk, tiles, one_step, warps), fp8 = _prepared(x_TK, w_FK, "w_FK", inter, widest, w_scale_inv,
                                                                    block)
    _mlp_gate_up_kernel[(T, triton.cdiv(inter, bn))](
        x_TK, w_FK, h_TI, *fp8[:3], K, inter, up_row, x_TK.stride(0), w_FK.stride(0), *fp8[3:6],
        BLOCK_N=bn, BLOCK_K=bk, K_TILES=tiles, ONE_STEP=one_step, FP8_W=w_scale_inv is not None,
        GROUP=block[1] if w_scale_inv is not None else 1, QCHUNK=fp8[6], QCHUNKS=fp8[7], INTERPRET=interp,
        num_warps=warps,
    )
    return h_TI


def triton_linear_add(x_TK: torch.Tensor, w_NK: torch.Tensor, addend_TN: torch.Tensor | None = None, *,
                      w_scale_inv: torch.Tensor | None = None, block: tuple[int, int] = DEFAULT_BLOCK) -> torch.Tensor:
    """Same contract as `reference_linear_add`: one launch for a decode batch, else the linear and the add."""
    N = w_NK.shape[0]
    block, widest = _checked(x_TK, w_NK, N, w_scale_inv, block, "w_NK")
    T, K = x_TK.shape
    if addend_TN is not None:
        check_weight("addend_TN", addend_TN, (T, N), x_TK.dtype)
    if T > FUSED_MAX_TOKENS or widest < 8:
        y_TN = _linear(x_TK, w_NK, w_scale_inv, block)
        return y_TN if addend_TN is None else y_TN + addend_TN
    y_TN = common.workspace((T, N), x_TK.dtype, x_TK.device)
    if T == 0:
        return y_TN
    if addend_TN is not None and addend_TN.stride(-1) != 1:
        addend_TN = addend_TN.contiguous()
    x_TK, interp, (bn, bk, tiles, one_step, warps), fp8 = _prepared(x_TK, w_NK, "w_NK", N, widest, w_scale_inv, block)
    _mlp_down_kernel[(T, triton.cdiv(N, bn))](
        x_TK, w_NK, addend_TN if addend_TN is not None else x_TK, y_TN, *fp8[:3], K, N, x_TK.stride(0),
        w_NK.stride(0), addend_TN.stride(0) if addend_TN is not None else 0, *fp8[3:6],
        HAS_ADD=addend_TN is not None, BLOCK_N=bn, BLOCK_K=bk, K_TILES=tiles, ONE_STEP=one_step,
        FP8_W=w_scale_inv is not None, GROUP=block[1] if w_scale_inv is not None else 1, QCHUNK=fp8[6],
        QCHUNKS=fp8[7], INTERPRET=interp, num_warps=warps,
    )
    return y_TN
