"""The MLA attention input in one launch (kernels/mla_input.py is the contract): latent RMSNorm, rotary of q_pe
and k_pe, latent cache write. Grid (T, N + 1): program (t, n < N) rotates query head n's rope part; program
(t, N) norms the token's latent, rotates its shared rope key and writes the cache row [latent | key].

Legend: T tokens, N heads, C kv_lora_rank, P rope dims, h = P/2.

Numerics: the unfused path's roundings. The latent norm is kernels/triton_norm.py's (fp32 mean square and
scaling, cast to the activation dtype, times the weight, rounded). "neox": kernels/triton_rotary.py's (cos/sin
cast to the activation dtype, each product rounded, the sum rounded). "complex": transformers' complex64
product in fp32, re = a·c − b·d, im = a·d + b·c, each product rounded before the add (no FMA), then one rounding
to the activation dtype: torch's CPU complex multiply bit for bit in its vector loop (rope widths with P/2 a
multiple of 8, as every DeepSeek model's; its scalar tail contracts into an FMA). torch's CUDA complex multiply
may contract too, so on a GPU the fp32 result can sit an ulp from torch's before the bf16 rounding. The latent's fp32 sum of squares associates in the tile's order (as the unfused norm kernel's).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .attention import FP8_CACHE_DTYPES
from .mla import check_latent_cache
from .mla_input import ROPE_STYLES
from .triton_common import cast
from .triton_norm import rms_normalize


@triton.jit
def _rope(src, cs_ptr, pos, stride_cs, half, COMPLEX: tl.constexpr, BLOCK_HALF: tl.constexpr,
          INTERPRET: tl.constexpr):
    """One head's rope part rotated: (values a, values b, offsets of a, offsets of b), the values fp32 already
    rounded to src's dtype. neox pairs (j, j + h); complex pairs (2j, 2j + 1)."""
    dt = src.dtype.element_ty
    j = tl.arange(0, BLOCK_HALF)
    ok = j < half
    if COMPLEX:
        oa, ob = 2 * j, 2 * j + 1
        c = tl.load(cs_ptr + pos * stride_cs + oa, mask=ok, other=0.0)
        d = tl.load(cs_ptr + pos * stride_cs + ob, mask=ok, other=0.0)
        a = tl.load(src + oa, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(src + ob, mask=ok, other=0.0).to(tl.float32)
        ra = cast(a * c - b * d, dt, INTERPRET).to(tl.float32)
        rb = cast(a * d + b * c, dt, INTERPRET).to(tl.float32)
    else:
        oa, ob = j, j + half
        cos = cast(tl.load(cs_ptr + pos * stride_cs + j, mask=ok, other=0.0), dt, INTERPRET).to(tl.float32)
        sin = cast(tl.load(cs_ptr + pos * stride_cs + half + j, mask=ok, other=0.0), dt, INTERPRET).to(tl.float32)
        x1 = tl.load(src + oa, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + ob, mask=ok, other=0.0).to(tl.float32)
        ra = cast(cast(x1 * cos, dt, INTERPRET).to(tl.float32) + cast(-x2 * sin, dt, INTERPRET).to(tl.float32),
                  dt, INTERPRET).to(tl.float32)
        rb = cast(cast(x2 * cos, dt, INTERPRET).to(tl.float32) + cast(x1 * sin, dt, INTERPRET).to(tl.float32),
                  dt, INTERPRET).to(tl.float32)
    return ra, rb, oa, ob, ok


@triton.jit
def _cache_value(x, scale, dt: tl.constexpr, FP8: tl.constexpr, INTERPRET: tl.constexpr):
    if FP8:  # x / scale saturated to e4m3's range, as the latent write does
        x = tl.minimum(tl.maximum(tl.div_rn(x, tl.full(x.shape, scale, tl.float32)), -448.0), 448.0)
    return cast(x, dt, INTERPRET)


@triton.jit
def _mla_input_kernel(qpe_ptr, ckv_ptr, kpe_ptr, pos_ptr, cs_ptr, w_ptr, qo_ptr, cache_ptr, slot_ptr,
                      stride_qt, stride_qn, stride_ct, stride_kt, stride_cs, num_heads, C, half, eps, kv_scale,
                      COMPLEX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HALF: tl.constexpr, FP8: tl.constexpr,
                      INTERPRET: tl.constexpr):
    t = tl.program_id(0)
    head = tl.program_id(1)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    dt = qpe_ptr.dtype.element_ty
    if head < num_heads:
        src = qpe_ptr + t.to(tl.int64) * stride_qt + head * stride_qn
        ra, rb, oa, ob, ok = _rope(src, cs_ptr, pos, stride_cs, half, COMPLEX, BLOCK_HALF, INTERPRET)
        dst = qo_ptr + (t.to(tl.int64) * num_heads + head) * (2 * half)
        tl.store(dst + oa, cast(ra, dt, INTERPRET), mask=ok)
        tl.store(dst + ob, cast(rb, dt, INTERPRET), mask=ok)
    else:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:  # slot -1: a padding token, its row goes nowhere
            cdt = cache_ptr.dtype.element_ty
            row = cache_ptr + slot * (C + 2 * half)
            offs = tl.arange(0, BLOCK_C)
            c_ok = offs < C
            x = tl.load(ckv_ptr + t.to(tl.int64) * stride_ct + offs, mask=c_ok, other=0.0)
            y = rms_normalize(x.to(tl.float32), C, eps, dt, INTERPRET)
            w = tl.load(w_ptr + offs, mask=c_ok, other=0.0)
            normed = cast(y.to(tl.float32) * w.to(tl.float32), dt, INTERPRET).to(tl.float32)
            tl.store(row + offs, _cache_value(normed, kv_scale, cdt, FP8, INTERPRET), mask=c_ok)
            src = kpe_ptr + t.to(tl.int64) * stride_kt
            ra, rb, oa, ob, ok = _rope(src, cs_ptr, pos, stride_cs, half, COMPLEX, BLOCK_HALF, INTERPRET)
            tl.store(row + C + oa, _cache_value(ra, kv_scale, cdt, FP8, INTERPRET), mask=ok)
            tl.store(row + C + ob, _cache_value(rb, kv_scale, cdt, FP8, INTERPRET), mask=ok)


def triton_mla_rope_write_latent(
    q_pe_TNP: torch.Tensor, ckv_TC: torch.Tensor, k_pe_TP: torch.Tensor, positions_T: torch.Tensor,
    table: torch.Tensor, style: str, norm_C: torch.Tensor, eps: float, latent_cache_BLR: torch.Tensor,
    slot_mapping_T: torch.Tensor, kv_scale: float = 1.0, *, q_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `reference_mla_rope_write_latent`, one launch; the inputs may be strided views with a unit
    last stride. The norm weight must have the activations' dtype (the model's)."""
    if style not in ROPE_STYLES:
        raise ValueError(f"style={style!r} is invalid: choose from {', '.join(ROPE_STYLES)}.")
    common.check_dtype("q_pe_TNP", q_pe_TNP)
    T, N, P = q_pe_TNP.shape
    C = ckv_TC.shape[1]
    for name, x, want in (("ckv_TC", ckv_TC, (T, C)), ("k_pe_TP", k_pe_TP, (T, P)), ("norm_C", norm_C, (C,))):
        if tuple(x.shape) != want or x.dtype != q_pe_TNP.dtype:
            raise ValueError(f"{name} {tuple(x.shape)} {x.dtype} is invalid: must be {list(want)} {q_pe_TNP.dtype}.")
    complex_style = style == "complex"
    if complex_style:
        if table.dtype != torch.complex64 or table.dim() != 2 or table.shape[1] * 2 != P:
            raise ValueError(f"table {tuple(table.shape)} {table.dtype} is invalid for style='complex': must be "
                             f"complex64 [positions, {P // 2}].")
        table = torch.view_as_real(table).flatten(1)  # [P', h, 2] float32: (re, im) pairs, as stored
    elif table.dtype != torch.float32 or table.dim() != 2 or table.shape[1] != P:
        raise ValueError(f"table {tuple(table.shape)} {table.dtype} is invalid for style={style!r}: must be float32 "
                         f"[positions, {P}] (cos | sin).")
    if P % 2:
        raise ValueError(f"q_pe_TNP has {P} rope dims: they must be even.")
    check_latent_cache("latent_cache_BLR", latent_cache_BLR, C + P)
    q_pe_TNP, ckv_TC, k_pe_TP, table = (t if t.stride(-1) == 1 else t.contiguous()
                                        for t in (q_pe_TNP, ckv_TC, k_pe_TP, table))
    q_out = common.out_buffer(q_out, "q_out", (T, N, P), q_pe_TNP.dtype, q_pe_TNP.device)
    if T == 0:
        return q_out
    _mla_input_kernel[(T, N + 1)](
        q_pe_TNP, ckv_TC, k_pe_TP, positions_T, table, norm_C, q_out, latent_cache_BLR, slot_mapping_T,
        q_pe_TNP.stride(0), q_pe_TNP.stride(1), ckv_TC.stride(0), k_pe_TP.stride(0), table.stride(0), N, C, P // 2,
        float(eps), float(kv_scale), COMPLEX=complex_style, BLOCK_C=triton.next_power_of_2(C),
        BLOCK_HALF=triton.next_power_of_2(P // 2), FP8=latent_cache_BLR.dtype in FP8_CACHE_DTYPES,
        INTERPRET=common.interpreting(q_pe_TNP), num_warps=4 if C > 256 else 1,
        enable_fp_fusion=False,  # no FMA: torch rounds each product before adding, and so must we
    )
    return q_out
