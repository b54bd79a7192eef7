"""Writing a step's keys and values into the paged KV cache (Triton): one program per (token, row chunk); a
padding token's slot -1 writes nothing; an fp8 cache stores x / scale saturated to e4m3's range.
Split out of triton_attention.py (which re-exports `triton_write_kv`)."""
from __future__ import annotations

import triton
import triton.language as tl

from . import triton_common as common
from .attention import FP8_CACHE_DTYPES
from .triton_common import cast


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_kt, stride_vt, row, row_v, k_scale, v_scale,
                     BLOCK: tl.constexpr, INTERPRET: tl.constexpr, FP8: tl.constexpr):
    """row = K * H values of k, row_v = K * Hv of v (equal but for narrower values)."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = (tl.zeros([BLOCK], dtype=tl.int64) + slot) >= 0  # slot -1: padding token, skip
    ok = (offs < row) & live
    ok_v = (offs < row_v) & live
    dt = kc_ptr.dtype.element_ty
    k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + offs, mask=ok, other=0.0)
    v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + offs, mask=ok_v, other=0.0)
    if FP8:  # x / scale saturated to e4m3's range (a bare cast makes NaN of an out-of-range value)
        k = tl.minimum(tl.maximum(tl.div_rn(k.to(tl.float32), tl.full(k.shape, k_scale, tl.float32)), -448.0), 448.0)
        v = tl.minimum(tl.maximum(tl.div_rn(v.to(tl.float32), tl.full(v.shape, v_scale, tl.float32)), -448.0), 448.0)
    tl.store(kc_ptr + slot * row + offs, cast(k, dt, INTERPRET), mask=ok)
    tl.store(vc_ptr + slot * row_v + offs, cast(v, dt, INTERPRET), mask=ok_v)


def triton_write_kv(k_TKH, v_TKH, k_cache_BLKH, v_cache_BLKH, slot_mapping_T, k_scale: float = 1.0,
                    v_scale: float = 1.0) -> None:
    """Same contract as `reference_write_kv` (in place); slots < 0 are skipped (padding tokens)."""
    T, K, H = k_TKH.shape
    Hv = v_TKH.shape[2]  # H but for narrower values (MiMo-V2-Flash)
    if T == 0:
        return
    for name, c, h in (("k_cache_BLKH", k_cache_BLKH, H), ("v_cache_BLKH", v_cache_BLKH, Hv)):
        if not c.is_contiguous() or tuple(c.shape[2:]) != (K, h):
            raise ValueError(f"{name} {tuple(c.shape)} is invalid: must be contiguous [blocks, L, {K}, {h}].")
    k_TKH = k_TKH if k_TKH[0].is_contiguous() else k_TKH.contiguous()
    v_TKH = v_TKH if v_TKH[0].is_contiguous() else v_TKH.contiguous()
    row, row_v = K * H, K * Hv
    BLOCK = min(1024, triton.next_power_of_2(max(row, row_v)))
    _write_kv_kernel[(T, triton.cdiv(max(row, row_v), BLOCK))](
        k_TKH, v_TKH, k_cache_BLKH, v_cache_BLKH, slot_mapping_T, k_TKH.stride(0), v_TKH.stride(0), row, row_v,
        float(k_scale), float(v_scale), BLOCK=BLOCK, INTERPRET=common.interpreting(k_TKH),
        FP8=k_cache_BLKH.dtype in FP8_CACHE_DTYPES, num_warps=4,
    )
