"""The pieces of the decode-batch GEMVs that carry a layer's small ops in their own launch
(kernels/triton_qkv_rope_kv.py: the input norm before, rope_write_kv after; kernels/triton_linear_norm.py: the
residual add and the next norm after): a row block of `y = x Wᵀ` for one token on the CUDA cores, its input
optionally normed on the fly, and the launch shape.

Legend: T tokens, K in features, N out features (rows of W), BN rows a program, BK a K tile.

Why the CUDA cores: at one to eight tokens an MMA of M = 16 wastes most of its work and gains nothing on a step
bound by the weight's bytes; a [BN, BK] fp32 tile of products reduced once at the end is what
kernels/triton_moe_tiny.py's GEMVs do. K_TILES tiles a step are unrolled (static_range): no tile's loads wait on an
earlier tile's products, so a program keeps its rows' bytes in flight (Triton does not pipeline loads that feed
no dot).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .moe_schedule import num_sms
from .triton_common import cast


@triton.jit
def summed(x_row, r_row, k, ok, HAS_RES: tl.constexpr, INTERPRET: tl.constexpr):
    """x + residual at columns k, rounded to x's dtype (torch's add), or x alone."""
    x = tl.load(x_row + k, mask=ok, other=0.0)
    if HAS_RES:
        r = tl.load(r_row + k, mask=ok, other=0.0)
        x = cast(x.to(tl.float32) + r.to(tl.float32), x_row.dtype.element_ty, INTERPRET)
    return x


@triton.jit
def normed(s, inv, w, dt: tl.constexpr, INTERPRET: tl.constexpr):
    """The RMSNorm of values s (x's dtype) given the row's inverse rms and the weight: s·inv rounded, times the
    weight, rounded (kernels/triton_norm.py's roundings, bit for bit)."""
    y = cast(s.to(tl.float32) * inv, dt, INTERPRET)
    return cast(y.to(tl.float32) * w.to(tl.float32), dt, INTERPRET)


@triton.jit
def gemv_block_arrive(x_row, w_ptr, b_ptr, out_row, cnt_ptr, pid_n, rows, in_features, stride_wn,
                      HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr,
                      ONE_STEP: tl.constexpr, INTERPRET: tl.constexpr):
    """Rows [pid_n BN, (pid_n + 1) BN) of x Wᵀ (+ bias) for one token, rounded into out_row (its dtype, as the
    matmul would have written them), then this program's arrival: a CTA barrier (every thread's stores before the
    release) and the counter's acq_rel add at GPU scope. Returns the count before this program's: the caller whose
    count completes its group is the last, and reads the others' rows (volatile loads) after resetting it."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < rows
    offs_k = tl.arange(0, BLOCK_K)[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc = gemv_row(acc, x_row, w_ptrs, n_ok[:, None], offs_k, in_features, BLOCK_K, K_TILES, ONE_STEP)
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_row + offs_n, cast(y, out_row.dtype.element_ty, INTERPRET), mask=n_ok)
    tl.debug_barrier()  # every thread's stores before the release
    return tl.atomic_add(cnt_ptr, 1, sem="acq_rel")


@triton.jit
def gemv_row(acc, x_row, w_ptrs, n_ok, offs_k, in_features, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr,
             ONE_STEP: tl.constexpr):
    """The row block's products over all K into acc: one straight-line step of K_TILES tiles (ONE_STEP), or a loop
    of such steps."""
    if ONE_STEP:
        acc = gemv_tiles(acc, x_row, w_ptrs, n_ok, offs_k, 0, in_features, BLOCK_K, K_TILES)
    else:
        for k0 in range(0, in_features, BLOCK_K * K_TILES):
            acc = gemv_tiles(acc, x_row, w_ptrs, n_ok, offs_k, k0, in_features, BLOCK_K, K_TILES)
    return acc


@triton.jit
def gemv_tiles(acc, x_row, w_ptrs, n_ok, offs_k, k0, in_features, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr):
    """K_TILES tiles of a row block's products into acc [BN, BK]: W rows (w_ptrs [BN, BK] at column 0, n_ok
    [BN, 1]) times the token's inputs at columns k0 + i BK + offs_k, loaded as [BN, BK] in the weight tile's own
    layout (each row's lanes read the same x: L1 hits): a [1, BK] load gets a layout of its own, and its conversion
    put shared memory and three barriers between every two tiles, so no tile's loads were issued before the one
    before was consumed (the compile report's "KB in flight": one tile's)."""
    for i in tl.static_range(K_TILES):
        k = k0 + i * BLOCK_K + offs_k
        ok = k < in_features
        w = tl.load(w_ptrs + (k0 + i * BLOCK_K), mask=n_ok & ok, other=0.0)
        kb = k + tl.zeros(acc.shape, dtype=tl.int32)
        x = tl.load(x_row + kb, mask=kb < in_features, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)
    return acc


def launch_shape(rows: int, in_features: int, widest: int, interp: bool, device, narrowest: int = 8,
                 itemsize: int = 2) -> tuple[int, int, int, bool, int]:
    """(BN, BK, K_TILES, ONE_STEP, num_warps) of a decode-batch GEMV over `rows` rows: the widest block (`widest`, a
    power of two the caller's grouping allows) that still gives every SM two programs at one token (the grid's rows
    are its bytes in flight), down to `narrowest`; then a [BN, BK] fp32 product tile of 4,096 values (32 registers a
    thread at 4 warps). ONE_STEP: the whole row in tiles of at most 32 kB a program with no loop (ptxas hoists a
    straight line's loads ahead of the products, not a runtime loop's), else steps of up to four tiles' loads, 32 kB
    a program (two of a float32 weight's: `itemsize`); 64 kB straight-line spilled (compile_tiny --cases fused).
    Not a function of the batch: a row's products are summed in the same order (the same tiles, the same
    reduction tree) at every batch size, so a token's outputs do not depend on its batch."""
    bn = widest
    if interp:
        return bn, 32, 1, False, 1
    sms = num_sms(device)
    while bn > narrowest and triton.cdiv(rows, bn) < 2 * sms:
        bn //= 2
    bk = max(16, min(4096 // bn, triton.next_power_of_2(in_features)))
    whole = triton.cdiv(in_features, bk)
    if whole * bn * bk * itemsize <= 32768:
        return bn, bk, whole, True, 4
    return bn, bk, max(1, min(4, whole, 32768 // (bn * bk * itemsize))), False, 4


def checked_counters(counters_T: torch.Tensor | None, device) -> torch.Tensor:
    """A launch's per-token counters: the caller's (checked: FUSED_MAX_TOKENS int32, zeros the launches leave zero,
    one tensor a layer), or new zeros."""
    from .norm import FUSED_MAX_TOKENS

    if counters_T is None:
        return torch.zeros(FUSED_MAX_TOKENS, dtype=torch.int32, device=device)
    if tuple(counters_T.shape) != (FUSED_MAX_TOKENS,) or counters_T.dtype != torch.int32:
        raise ValueError(f"counters_T {tuple(counters_T.shape)} {counters_T.dtype} is invalid: must be "
                         f"[{FUSED_MAX_TOKENS}] int32 zeros (a layer's per-token counters).")
    return counters_T


def check_weight(name: str, w: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if tuple(w.shape) != shape or w.dtype != dtype:
        raise ValueError(f"{name} {tuple(w.shape)} {w.dtype} is invalid: must be {list(shape)} {dtype}.")
