"""RMSNorm and residual-add + RMSNorm in Triton, one program per row.

Legend: T tokens, D normalised size, R rows (T, or T*heads for the per-head q/k norm).

Numerics follow `reference_rms_norm` (the Hugging Face definition) step by
step: the mean square and the scaling in fp32, a cast back to x's dtype,
then the weight multiply in the output dtype (bf16·bf16 products are exact in
fp32, so one rounding gives what torch gives). The residual sum is rounded to
x's dtype before it is normalised, as `x + residual` is in torch.

`triton_add_rms_norm_fp8` (issue 80's FP8 decode row) also writes the output quantized for W8A8 FP8 experts in
the same launch (QUANT: per token, per GROUP channels, `quant_tile`, bit for bit fp8.per_token_group_quant of the
output): the MoE after it then runs no quantization launch of its own (kernels/triton_moe_fp8_tiny.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .triton_common import cast
from .fp8 import FP8_DTYPE
from .triton_fp8 import quant_tile


@triton.jit
def inverse_rms(ssq, n, eps):
    """1 / sqrt(ssq / n + eps) of a row's fp32 sum of squares over n values: the reference's rsqrt(var + eps),
    each step correctly rounded. Plain `/` and tl.sqrt compile to approximate instructions on a GPU (the
    interpreter is exact), which would move bf16 outputs by a last bit. Every kernel that norms a row uses it (the
    per-head q/k norms of triton_rope_kv.py, the decode GEMVs' norms)."""
    var = tl.div_rn(ssq, tl.zeros_like(ssq) + n)
    return tl.div_rn(tl.zeros_like(var) + 1.0, tl.sqrt_rn(var + eps))


@triton.jit
def rms_normalize(x32, D, eps, dt: tl.constexpr, INTERPRET: tl.constexpr):
    """A row's x * rsqrt(mean(x²) + eps) (x32: its D values in fp32, zeros past them), cast to dt (x's dtype)."""
    return cast(x32 * inverse_rms(tl.sum(x32 * x32, axis=0), D, eps), dt, INTERPRET)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, q_ptr, qs_ptr, inner, D, eps,
                     stride_xo, stride_xi, stride_ro, stride_ri, stride_oo, stride_so,
                     HAS_RES: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, INTERPRET: tl.constexpr,
                     QUANT: tl.constexpr = False, GROUP: tl.constexpr = 128):
    # A row is (outer, inner): strided [T, heads, D] views (q/k slices of qkv) need no copy.
    row = tl.program_id(0)
    outer, inn = row // inner, row % inner
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    x_dt = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + outer.to(tl.int64) * stride_xo + inn * stride_xi + offs, mask=ok, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + outer.to(tl.int64) * stride_ro + inn * stride_ri + offs, mask=ok, other=0.0)
        x = cast(x.to(ACC) + r.to(ACC), x_dt, INTERPRET)
        tl.store(sum_ptr + row.to(tl.int64) * stride_so + offs, x, mask=ok)
    y = rms_normalize(x.to(tl.float32), D, eps, x_dt, INTERPRET)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0)
    out = cast(y.to(ACC) * w.to(ACC), out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptr + row.to(tl.int64) * stride_oo + offs, out, mask=ok)
    if QUANT:  # [T, D] rows only (stride_oo = D): the rounded output, as the experts would quantize it
        GROUPS: tl.constexpr = BLOCK_D // GROUP
        q, qs = quant_tile(tl.reshape(out.to(tl.float32), [1, BLOCK_D]), GROUPS, GROUP, INTERPRET)
        tl.store(q_ptr + row.to(tl.int64) * stride_oo + offs, tl.reshape(q, [BLOCK_D]), mask=ok)
        offs_g = tl.arange(0, GROUPS)
        tl.store(qs_ptr + row.to(tl.int64) * ((D + GROUP - 1) // GROUP) + offs_g, tl.reshape(qs, [GROUPS]),
                 mask=offs_g * GROUP < D)


def _rows(t: torch.Tensor, name: str):
    """(outer, inner, stride_outer, stride_inner) of a [..., D] tensor with a unit last stride."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 2:
        return t, t.shape[0], 1, t.stride(0), 0
    if t.dim() == 3:
        return t, t.shape[0], t.shape[1], t.stride(0), t.stride(1)
    raise ValueError(f"{name} has {t.dim()} dims: the Triton RMSNorm takes [T, D] or [T, heads, D].")


def _launch(x, res, weight_D, eps, out, summed, quant=None):
    common.check_dtype("x", x)
    if x.shape[-1] != weight_D.shape[0]:
        raise ValueError(f"weight_D has {weight_D.shape[0]} elements: it must match x's last dim {x.shape[-1]}.")
    x, outer, inner, sxo, sxi = _rows(x, "x")
    D = x.shape[-1]
    out_dtype = torch.promote_types(weight_D.dtype, x.dtype)
    if out is None:
        out = common.workspace(x.shape, out_dtype, x.device)
    if out.shape != x.shape or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} is invalid: must be contiguous {tuple(x.shape)} {out_dtype}.")
    rows = outer * inner
    if rows == 0:
        return out, summed
    interp = common.interpreting(x)
    acc = tl.float64 if out_dtype == torch.float64 else tl.float32
    if res is not None:
        res, _, _, sro, sri = _rows(res, "residual")
        if summed is None:
            summed = common.workspace(x.shape, x.dtype, x.device)
        if summed.shape != x.shape or summed.dtype != x.dtype or not summed.is_contiguous():
            raise ValueError(f"residual_out {tuple(summed.shape)} {summed.dtype} is invalid: must be contiguous "
                             f"{tuple(x.shape)} {x.dtype}.")
    else:
        sro = sri = 0
    BLOCK_D = triton.next_power_of_2(D)
    q, qs, group = quant if quant is not None else (out, out, 128)
    if quant is not None and BLOCK_D < group:  # (the tile holds whole groups: lanes past D are masked zeros, they raise no amax)
        raise ValueError(f"D={D} is below the quantization group {group}: quantize apart (triton_fp8).")
    _rms_norm_kernel[(rows,)](
        x, res if res is not None else x, weight_D, out, summed if summed is not None else out, q, qs, inner, D, eps,
        sxo, sxi, sro, sri, D, D, HAS_RES=res is not None, BLOCK_D=BLOCK_D, ACC=acc, INTERPRET=interp,
        QUANT=quant is not None, GROUP=group, num_warps=min(16, max(1, BLOCK_D // 256)),
    )
    return out, summed


def triton_rms_norm(x_TD: torch.Tensor, weight_D: torch.Tensor, eps: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `reference_rms_norm`; x may also be a strided [T, heads, D] view. Returns a new contiguous tensor."""
    return _launch(x_TD, None, weight_D, eps, out, None)[0]


def triton_add_rms_norm(
    x_TD: torch.Tensor, residual_TD: torch.Tensor, weight_D: torch.Tensor, eps: float, *,
    out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `reference_add_rms_norm`: (norm(x + residual), x + residual), one pass over memory."""
    if residual_TD.shape != x_TD.shape or residual_TD.dtype != x_TD.dtype:
        raise ValueError(f"residual_TD {tuple(residual_TD.shape)} {residual_TD.dtype} must match x_TD "
                         f"{tuple(x_TD.shape)} {x_TD.dtype}.")
    return _launch(x_TD, residual_TD, weight_D, eps, out, residual_out)


def triton_add_rms_norm_fp8(
    x_TD: torch.Tensor, residual_TD: torch.Tensor, weight_D: torch.Tensor, eps: float, group: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as `norm.reference_add_rms_norm_fp8`: (norm(x + residual), x + residual, xq, xs), the
    quantized copy written by the norm's own program (one launch). x and the residual [T, D]; `group` a power of
    two (the experts' Bk, 128)."""
    if x_TD.dim() != 2 or residual_TD.shape != x_TD.shape or residual_TD.dtype != x_TD.dtype:
        raise ValueError(f"x_TD {tuple(x_TD.shape)} {x_TD.dtype} and residual_TD {tuple(residual_TD.shape)} "
                         f"{residual_TD.dtype}: both [T, D] of one dtype.")
    if group <= 0 or group & (group - 1):
        raise ValueError(f"group={group} is invalid: a power of two (the experts' Bk, 128).")
    T, D = x_TD.shape
    xq = common.workspace((T, D), FP8_DTYPE, x_TD.device)
    xs = common.workspace((T, triton.cdiv(D, group)), torch.float32, x_TD.device)
    out, summed = _launch(x_TD, residual_TD, weight_D, eps, None, None, (xq, xs, group))
    return out, summed, xq, xs
