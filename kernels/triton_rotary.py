"""Rotary position embedding in Triton (NeoX / Hugging Face `rotate_half` layout), q and k in one launch.

Legend: T tokens, N query heads, K kv heads, H head dim, h = H/2, P positions.

Numerics follow `reference_rotary` (and Hugging Face) operation by operation:
cos/sin are cast to the activation dtype first, then x·cos and rotate_half(x)·sin
are each rounded to that dtype before they are added. With fp32 arithmetic and
a rounding after every step this reproduces torch's bf16/fp16 results bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .triton_common import cast


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, t, stride_t, stride_n, num_heads, half, cos, sin,
                  BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERPRET: tl.constexpr):
    dt = dst_ptr.dtype.element_ty
    n = tl.arange(0, BLOCK_HEADS)
    j = tl.arange(0, BLOCK_HALF)
    ok = (n[:, None] < num_heads) & (j[None, :] < half)
    src = src_ptr + t.to(tl.int64) * stride_t + n[:, None] * stride_n + j[None, :]
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=ok, other=0.0).to(tl.float32)
    # out1 = x1·cos + (−x2)·sin, out2 = x2·cos + x1·sin, each product rounded (torch order).
    o1 = cast(x1 * cos, dt, INTERPRET).to(tl.float32) + cast(-x2 * sin, dt, INTERPRET).to(tl.float32)
    o2 = cast(x2 * cos, dt, INTERPRET).to(tl.float32) + cast(x1 * sin, dt, INTERPRET).to(tl.float32)
    dst = dst_ptr + t.to(tl.int64) * num_heads * 2 * half + n[:, None] * 2 * half + j[None, :]
    tl.store(dst, cast(o1, dt, INTERPRET), mask=ok)
    tl.store(dst + half, cast(o2, dt, INTERPRET), mask=ok)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cs_ptr, qo_ptr, ko_ptr,
                   stride_qt, stride_qn, stride_kt, stride_kn, stride_cs, num_q_heads, num_k_heads, half,
                   BLOCK_NQ: tl.constexpr, BLOCK_NK: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   INTERPRET: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    dt = qo_ptr.dtype.element_ty
    cos = tl.load(cs_ptr + pos * stride_cs + j, mask=j < half, other=0.0)
    sin = tl.load(cs_ptr + pos * stride_cs + half + j, mask=j < half, other=0.0)
    cos = cast(cos, dt, INTERPRET).to(tl.float32)[None, :]
    sin = cast(sin, dt, INTERPRET).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, qo_ptr, t, stride_qt, stride_qn, num_q_heads, half, cos, sin, BLOCK_NQ, BLOCK_HALF, INTERPRET)
    _rotate_heads(k_ptr, ko_ptr, t, stride_kt, stride_kn, num_k_heads, half, cos, sin, BLOCK_NK, BLOCK_HALF, INTERPRET)


def triton_rotary(
    q_TNH: torch.Tensor, k_TKH: torch.Tensor, positions_T: torch.Tensor, cos_sin_PH: torch.Tensor, *,
    q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `reference_rotary`: new contiguous q and k, rotated by their positions.

    q and k may be strided views (slices of a fused qkv projection) with a unit
    last stride; cos_sin_PH is the float32 [P, H] table of `rotary_cos_sin_cache`.
    """
    common.check_dtype("q_TNH", q_TNH)
    if k_TKH.dtype != q_TNH.dtype:
        raise ValueError(f"k_TKH.dtype={k_TKH.dtype} must match q_TNH.dtype={q_TNH.dtype}.")
    T, N, H = q_TNH.shape
    K = k_TKH.shape[1]
    if H % 2 or k_TKH.shape[2] != H or cos_sin_PH.shape[1] != H:
        raise ValueError(f"head dims q={H}, k={k_TKH.shape[2]}, cos_sin={cos_sin_PH.shape[1]} must agree and be even.")
    q_TNH, k_TKH, cos_sin_PH = (t if t.stride(-1) == 1 else t.contiguous() for t in (q_TNH, k_TKH, cos_sin_PH))
    q_out = q_out if q_out is not None else common.workspace((T, N, H), q_TNH.dtype, q_TNH.device)
    k_out = k_out if k_out is not None else common.workspace((T, K, H), k_TKH.dtype, k_TKH.device)
    for name, o, want in (("q_out", q_out, (T, N, H)), ("k_out", k_out, (T, K, H))):
        if tuple(o.shape) != want or o.dtype != q_TNH.dtype or not o.is_contiguous():
            raise ValueError(f"{name} {tuple(o.shape)} {o.dtype} is invalid: must be contiguous {want} {q_TNH.dtype}.")
    if T == 0:
        return q_out, k_out
    _rotary_kernel[(T,)](
        q_TNH, k_TKH, positions_T, cos_sin_PH, q_out, k_out,
        q_TNH.stride(0), q_TNH.stride(1), k_TKH.stride(0), k_TKH.stride(1), cos_sin_PH.stride(0), N, K, H // 2,
        BLOCK_NQ=triton.next_power_of_2(N), BLOCK_NK=triton.next_power_of_2(K),
        BLOCK_HALF=triton.next_power_of_2(H // 2), INTERPRET=common.interpreting(q_TNH), num_warps=4,
        enable_fp_fusion=False,  # no FMA: torch rounds x·cos before adding, and so must we
    )
    return q_out, k_out
