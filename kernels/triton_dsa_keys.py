"""The lightning indexer's fp8 key write in Triton (DeepSeek Sparse Attention): quantize this step's keys, e4m3 with a
float32 scale per SCALE_GROUP values, and scatter their rows into the key cache, one launch. Same contract and the
same bytes as dsa.reference_write_fp8_index_keys (legend there: T tokens, D index head dim, X the row's bytes).

Grid (T,): a program takes one token's key, per group its amax, scale = amax / 448 and key / scale (both divisions
round to nearest, as torch's), rounded to e4m3 (round to nearest even, as torch's cast; the value is clamped to
+-448 first), and stores the D e4m3 bytes, zeros in the pad, then the scales, at the token's slot; a padding token
(slot < 0) writes a zero row into the null block's first slot, as write_latent does. No host sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .triton_common import cast
from .dsa import SCALE_GROUP, check_fp8_index_write, fp8_index_views, fp8_key_groups


@triton.jit
def _write_fp8_keys_kernel(k_ptr, slots_ptr, key_ptr, scale_ptr, null_slot, stride_kt, stride_row, stride_srow, D,
                           GROUPS: tl.constexpr, GROUP: tl.constexpr, PAD: tl.constexpr, BLOCK_G: tl.constexpr,
                           INTERPRET: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t)
    keep = slot >= 0
    slot = tl.where(keep, slot, null_slot).to(tl.int64)
    row_ptr = key_ptr + slot * stride_row
    for g in tl.static_range(GROUPS):
        d = g * GROUP + tl.arange(0, BLOCK_G)
        ok = (d < D) & (d < (g + 1) * GROUP)
        k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + d, mask=ok, other=0.0).to(tl.float32)
        k = tl.where(keep, k, 0.0)  # a padding token's row: zeros
        scale = tl.div_rn(tl.max(tl.abs(k), axis=0), 448.0)
        q = tl.div_rn(k, tl.where(scale > 0, scale, 1.0))
        q = tl.minimum(tl.maximum(q, -448.0), 448.0)
        tl.store(row_ptr + d, cast(q, tl.float8e4nv, INTERPRET), mask=ok)  # (the interpreter's own cast drops a
        # rounding carry into the exponent: triton_common.cast rounds as the hardware does)
        tl.store(scale_ptr + slot * stride_srow + g, scale)
    if PAD > 0:  # the bytes between the key and the scales
        p = D + tl.arange(0, 4)
        tl.store(row_ptr + p, tl.zeros([4], tl.float32).to(key_ptr.dtype.element_ty), mask=p < D + PAD)


def triton_write_fp8_index_keys(k_TD: torch.Tensor, index_cache_BLX: torch.Tensor,
                                slot_mapping_T: torch.Tensor) -> None:
    """Same contract as `dsa.reference_write_fp8_index_keys` (in place; the same bytes). k_TD float32 / bfloat16 /
    float16."""
    common.check_dtype("k_TD", k_TD)
    check_fp8_index_write(k_TD, index_cache_BLX)
    T, D = k_TD.shape
    if T == 0:
        return
    k_TD = k_TD if k_TD.stride(-1) == 1 else k_TD.contiguous()
    keys, scales = fp8_index_views(index_cache_BLX, D)
    X = index_cache_BLX.shape[2]
    null_slot = (index_cache_BLX.shape[0] - 1) * index_cache_BLX.shape[1]
    _write_fp8_keys_kernel[(T,)](
        k_TD, slot_mapping_T, keys, scales, null_slot, k_TD.stride(0), X, X // 4, D, GROUPS=fp8_key_groups(D),
        GROUP=SCALE_GROUP, PAD=X - 4 * fp8_key_groups(D) - D, BLOCK_G=min(SCALE_GROUP, triton.next_power_of_2(D)),
        INTERPRET=common.interpreting(k_TD), num_warps=1 if D <= 128 else 2)


__all__ = ["triton_write_fp8_index_keys"]
