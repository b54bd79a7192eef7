"""The GQA attention input in one launch (kernels/rotary.py's reference_rope_write_kv is the contract): q/k RMSNorm
per head, rotary, paged-KV write of k and v. Grid (T, N + K): program (t, h < N) makes q head h of token t; program (t, N + j)
makes kv head j, k normed and roped and v as it is, written to the token's cache slot.

Legend: T tokens, N query heads, K kv heads, H head dim, Hv value head dim (H but for narrower values), R rotary
dims, h = R/2, Hp = H - R (passed through).

Numerics: the unfused path's roundings, step by step (kernels/triton_norm.py, triton_rotary.py,
triton_kv_write.py): the norm's mean square and scaling in fp32, cast to the activation dtype, times the
weight (exact in fp32) and rounded; the rotation on those rounded values, cos/sin cast to the activation dtype,
each product rounded, then the sum rounded (no FMA: enable_fp_fusion=False); the cache gets that value (an fp8
cache: / scale, saturated to ±448). The one difference from the unfused Triton path is none in the interpreter
and possible on a GPU only in the fp32 sum of squares, whose association depends on the tile layout (at most an
ulp of fp32 before the bf16 rounding; the unfused kernel differs from torch the same way).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .attention import FP8_CACHE_DTYPES
from .triton_common import cast
from .triton_norm import inverse_rms


@triton.jit
def _normed(src, offs, ok, inv, w_ptr, HAS_NORM: tl.constexpr, INTERPRET: tl.constexpr, VOLATILE: tl.constexpr):
    """x[offs] as fp32, normed (x·inv rounded, times the weight, rounded) when HAS_NORM."""
    dt = src.dtype.element_ty
    x = tl.load(src + offs, mask=ok, other=0.0, volatile=VOLATILE)
    if HAS_NORM:
        y = cast(x.to(tl.float32) * inv, dt, INTERPRET)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0)
        x = cast(y.to(tl.float32) * w.to(tl.float32), dt, INTERPRET)
    return x.to(tl.float32)


@triton.jit
def _to_cache(x, scale, FP8: tl.constexpr):
    """What the cache stores for fp32 x (already rounded to the activation dtype): x, or x / scale saturated."""
    if FP8:
        return tl.minimum(tl.maximum(tl.div_rn(x, tl.full(x.shape, scale, tl.float32)), -448.0), 448.0)
    return x


@triton.jit
def rope_kv_head(q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, qn_ptr, kn_ptr, qo_ptr, kc_ptr, vc_ptr, slot_ptr, t, head,
                 stride_qt, stride_qn, stride_kt, stride_kn, stride_vt, stride_vn, stride_cs,
                 num_q_heads, num_kv_heads, head_dim, v_head_dim, half, eps, k_scale, v_scale,
                 HAS_NORM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HV: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 BLOCK_PASS: tl.constexpr, FP8: tl.constexpr, INTERPRET: tl.constexpr, VOLATILE: tl.constexpr):
    """Head `head` of token `t` (< N: query head `head`; else kv head head - N, its k and v): the body of one
    program of `_rope_kv_kernel`, and the epilogue of kernels/triton_qkv_rope_kv.py's last-arriving program
    (VOLATILE: q, k and v were written by other programs of the same launch, so they are read past L1)."""
    is_q = head < num_q_heads
    kv = head - num_q_heads
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if is_q:
        src = q_ptr + t.to(tl.int64) * stride_qt + head * stride_qn
        w_ptr = qn_ptr
    else:
        src = k_ptr + t.to(tl.int64) * stride_kt + kv * stride_kn
        w_ptr = kn_ptr
    dt = q_ptr.dtype.element_ty
    inv = 0.0
    if HAS_NORM:  # the whole head's mean square, as triton_norm reduces one row
        offs = tl.arange(0, BLOCK_H)
        x32 = tl.load(src + offs, mask=offs < head_dim, other=0.0, volatile=VOLATILE).to(tl.float32)
        inv = inverse_rms(tl.sum(x32 * x32, axis=0), head_dim, eps)
    j = tl.arange(0, BLOCK_HALF)
    j_ok = j < half
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos = cast(tl.load(cs_ptr + pos * stride_cs + j, mask=j_ok, other=0.0), dt, INTERPRET).to(tl.float32)
    sin = cast(tl.load(cs_ptr + pos * stride_cs + half + j, mask=j_ok, other=0.0), dt, INTERPRET).to(tl.float32)
    x1 = _normed(src, j, j_ok, inv, w_ptr, HAS_NORM, INTERPRET, VOLATILE)
    x2 = _normed(src, j + half, j_ok, inv, w_ptr, HAS_NORM, INTERPRET, VOLATILE)
    # out1 = x1·cos + (−x2)·sin, out2 = x2·cos + x1·sin, each product rounded (torch's order).
    o1 = cast(cast(x1 * cos, dt, INTERPRET).to(tl.float32) + cast(-x2 * sin, dt, INTERPRET).to(tl.float32),
              dt, INTERPRET).to(tl.float32)
    o2 = cast(cast(x2 * cos, dt, INTERPRET).to(tl.float32) + cast(x1 * sin, dt, INTERPRET).to(tl.float32),
              dt, INTERPRET).to(tl.float32)
    p = 2 * half + tl.arange(0, BLOCK_PASS)
    p_ok = p < head_dim
    xp = _normed(src, p, p_ok, inv, w_ptr, HAS_NORM, INTERPRET, VOLATILE)
    if is_q:
        dst = qo_ptr + (t.to(tl.int64) * num_q_heads + head) * head_dim
        tl.store(dst + j, cast(o1, dt, INTERPRET), mask=j_ok)
        tl.store(dst + half + j, cast(o2, dt, INTERPRET), mask=j_ok)
        tl.store(dst + p, cast(xp, dt, INTERPRET), mask=p_ok)
    elif slot >= 0:  # slot -1: a padding token, nothing written
        cdt = kc_ptr.dtype.element_ty
        row = num_kv_heads * head_dim
        kdst = kc_ptr + slot * row + kv * head_dim
        tl.store(kdst + j, cast(_to_cache(o1, k_scale, FP8), cdt, INTERPRET), mask=j_ok)
        tl.store(kdst + half + j, cast(_to_cache(o2, k_scale, FP8), cdt, INTERPRET), mask=j_ok)
        tl.store(kdst + p, cast(_to_cache(xp, k_scale, FP8), cdt, INTERPRET), mask=p_ok)
        offs_v = tl.arange(0, BLOCK_HV)
        v_ok = offs_v < v_head_dim
        v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + kv * stride_vn + offs_v, mask=v_ok, other=0.0,
                    volatile=VOLATILE)
        v = _to_cache(v.to(tl.float32), v_scale, FP8)
        tl.store(vc_ptr + slot * (num_kv_heads * v_head_dim) + kv * v_head_dim + offs_v, cast(v, cdt, INTERPRET),
                 mask=v_ok)


@triton.jit
def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, qn_ptr, kn_ptr, qo_ptr, kc_ptr, vc_ptr, slot_ptr,
                    stride_qt, stride_qn, stride_kt, stride_kn, stride_vt, stride_vn, stride_cs,
                    num_q_heads, num_kv_heads, head_dim, v_head_dim, half, eps, k_scale, v_scale,
                    HAS_NORM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HV: tl.constexpr, BLOCK_HALF: tl.constexpr,
                    BLOCK_PASS: tl.constexpr, FP8: tl.constexpr, INTERPRET: tl.constexpr):
    rope_kv_head(q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, qn_ptr, kn_ptr, qo_ptr, kc_ptr, vc_ptr, slot_ptr,
                 tl.program_id(0), tl.program_id(1), stride_qt, stride_qn, stride_kt, stride_kn, stride_vt, stride_vn,
                 stride_cs, num_q_heads, num_kv_heads, head_dim, v_head_dim, half, eps, k_scale, v_scale,
                 HAS_NORM, BLOCK_H, BLOCK_HV, BLOCK_HALF, BLOCK_PASS, FP8, INTERPRET, False)


def check_rope_kv(H: int, Hv: int, K: int, dtype: torch.dtype, cos_sin_PR: torch.Tensor, k_cache_BLKH: torch.Tensor,
                  v_cache_BLKH: torch.Tensor, q_norm_H: torch.Tensor | None, k_norm_H: torch.Tensor | None) -> int:
    """The rotary table, the per-head norms and the caches as rope_kv_head reads them (one clear error naming the
    argument); returns the rotary dims R. kernels/triton_qkv_rope_kv.py checks its launch with it too."""
    R = cos_sin_PR.shape[-1]
    if R % 2 or R > H:
        raise ValueError(f"cos_sin_PR has {R} columns: the rotary dims must be even and at most head_dim={H}.")
    if (q_norm_H is None) != (k_norm_H is None):
        raise ValueError("q_norm_H and k_norm_H must be given together (a per-head q/k norm) or both be None.")
    for name, w in (("q_norm_H", q_norm_H), ("k_norm_H", k_norm_H)):
        if w is not None and (tuple(w.shape) != (H,) or w.dtype != dtype):
            raise ValueError(f"{name} {tuple(w.shape)} {w.dtype} is invalid: must be [{H}] {dtype}.")
    for name, c, h in (("k_cache_BLKH", k_cache_BLKH, H), ("v_cache_BLKH", v_cache_BLKH, Hv)):
        if not c.is_contiguous() or tuple(c.shape[2:]) != (K, h):
            raise ValueError(f"{name} {tuple(c.shape)} is invalid: must be contiguous [blocks, L, {K}, {h}].")
    return R


def triton_rope_write_kv(
    q_TNH: torch.Tensor, k_TKH: torch.Tensor, v_TKH: torch.Tensor, positions_T: torch.Tensor,
    cos_sin_PR: torch.Tensor, k_cache_BLKH: torch.Tensor, v_cache_BLKH: torch.Tensor, slot_mapping_T: torch.Tensor,
    q_norm_H: torch.Tensor | None = None, k_norm_H: torch.Tensor | None = None, eps: float = 1e-6,
    k_scale: float = 1.0, v_scale: float = 1.0, *, q_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `reference_rope_write_kv`, one launch; q, k, v may be strided views with a unit last
    stride (slices of the qkv projection). Norm weights, when given, must have q's dtype (the model's)."""
    common.check_dtype("q_TNH", q_TNH)
    T, N, H = q_TNH.shape
    K, Hv = k_TKH.shape[1], v_TKH.shape[-1]
    if k_TKH.dtype != q_TNH.dtype or v_TKH.dtype != q_TNH.dtype:
        raise ValueError(f"k_TKH.dtype={k_TKH.dtype} and v_TKH.dtype={v_TKH.dtype} must match q_TNH.dtype={q_TNH.dtype}.")
    if tuple(k_TKH.shape) != (T, K, H) or tuple(v_TKH.shape) != (T, K, Hv):
        raise ValueError(f"k_TKH {tuple(k_TKH.shape)} and v_TKH {tuple(v_TKH.shape)} must be [{T}, K, {H}] and "
                         f"[{T}, K, Hv].")
    R = check_rope_kv(H, Hv, K, q_TNH.dtype, cos_sin_PR, k_cache_BLKH, v_cache_BLKH, q_norm_H, k_norm_H)
    q_TNH, k_TKH, v_TKH, cos_sin_PR = (t if t.stride(-1) == 1 else t.contiguous()
                                       for t in (q_TNH, k_TKH, v_TKH, cos_sin_PR))
    q_out = q_out if q_out is not None else common.workspace((T, N, H), q_TNH.dtype, q_TNH.device)
    if tuple(q_out.shape) != (T, N, H) or q_out.dtype != q_TNH.dtype or not q_out.is_contiguous():
        raise ValueError(f"q_out {tuple(q_out.shape)} {q_out.dtype} is invalid: must be contiguous "
                         f"{(T, N, H)} {q_TNH.dtype}.")
    if T == 0:
        return q_out
    has_norm = q_norm_H is not None
    _rope_kv_kernel[(T, N + K)](
        q_TNH, k_TKH, v_TKH, positions_T, cos_sin_PR, q_norm_H if has_norm else q_TNH,
        k_norm_H if has_norm else q_TNH, q_out, k_cache_BLKH, v_cache_BLKH, slot_mapping_T,
        q_TNH.stride(0), q_TNH.stride(1), k_TKH.stride(0), k_TKH.stride(1), v_TKH.stride(0), v_TKH.stride(1),
        cos_sin_PR.stride(0), N, K, H, Hv, R // 2, float(eps), float(k_scale), float(v_scale),
        HAS_NORM=has_norm, BLOCK_H=triton.next_power_of_2(H), BLOCK_HV=triton.next_power_of_2(Hv), BLOCK_HALF=triton.next_power_of_2(max(R // 2, 1)),
        BLOCK_PASS=triton.next_power_of_2(max(H - R, 1)), FP8=k_cache_BLKH.dtype in FP8_CACHE_DTYPES,
        INTERPRET=common.interpreting(q_TNH), num_warps=1,
        enable_fp_fusion=False,  # no FMA: torch rounds x·cos before adding, and so must we
    )
    return q_out
