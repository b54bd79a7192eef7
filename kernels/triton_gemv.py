"""The pieces of the decode-batch GEMVs that carry a layer's small ops in their own launch
(kernels/triton_qkv_rope_kv.py: the input norm before, rope_write_kv after; kernels/triton_linear_norm.py: the
residual add and the next norm after): a row block of `y = x Wᵀ` for one token on the CUDA cores, its input
optionally normed on the fly, and the launch shape.

Legend: T tokens, K in features, N out features (rows of W), BN rows a program, BK a K tile, Bn x Bk an FP8
weight's scale block, G = ceil(K / Bk) activation groups.

FP8 weights (float8_e4m3fn with float32 `weight_scale_inv` [ceil(N / Bn), G], kernels/fp8.py's layout): W8A8 as
fp8.reference_fp8_linear computes it. The input row is quantized per Bk group by each program of the token into
a scratch row (`quant_chunk`: triton_fp8.quant_tile, bit for bit triton_per_token_group_quant; every program
writes the same bytes, as the normed row), then a tile's products are e4m3 weights times xq · (x scale · weight
block scale), the tile shaped [BN, BK / INNER, INNER] (INNER = min(BK, Bk): a group a row of the middle axis) so
each group's two scales load once (`gemv_fp8_rows`), and BN divides Bn, so a program's rows share one scale row.
Quantizing once a program rather than once a token costs K IEEE divisions a program (Qwen3-30B-A3B's qkv at one
token: 320 programs x 2,048, ~0.7 M, against 10.5 MB of weight bytes).

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

from . import triton_common as common
from .fp8 import FP8_DTYPE
from .moe_schedule import num_sms
from .triton_common import cast
from .triton_fp8 import check_fp8_weight, check_triton_block, quant_tile


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
def quant_chunk(v, xq_row, xs_row, c0, in_features, CHUNK: tl.constexpr, GROUP: tl.constexpr,
                INTERPRET: tl.constexpr):
    """Columns [c0, c0 + CHUNK) of an input row (values v [CHUNK], zeros past in_features; c0 and CHUNK multiples
    of GROUP) quantized per GROUP columns: e4m3 values to xq_row, float32 scales (amax / 448) to xs_row."""
    q, scale = quant_tile(tl.reshape(v.to(tl.float32), [1, CHUNK]), CHUNK // GROUP, GROUP, INTERPRET)
    k = c0 + tl.arange(0, CHUNK)
    tl.store(xq_row + k, tl.reshape(q, [CHUNK]), mask=k < in_features)
    g = c0 // GROUP + tl.arange(0, CHUNK // GROUP)
    tl.store(xs_row + g, tl.reshape(scale, [CHUNK // GROUP]), mask=g * GROUP < in_features)


@triton.jit
def quant_row(x_row, xq_row, xs_row, in_features, CHUNK: tl.constexpr, CHUNKS: tl.constexpr, GROUP: tl.constexpr,
              INTERPRET: tl.constexpr):
    """A whole input row quantized for the FP8 GEMV (`quant_chunk`, CHUNKS unrolled chunks: one L2 round trip),
    then a CTA barrier: the GEMV's threads read what others stored."""
    for c in tl.static_range(CHUNKS):
        k = c * CHUNK + tl.arange(0, CHUNK)
        quant_chunk(tl.load(x_row + k, mask=k < in_features, other=0.0), xq_row, xs_row, c * CHUNK, in_features,
                    CHUNK, GROUP, INTERPRET)
    tl.debug_barrier()


@triton.jit
def gemv_block_arrive(x_row, w_ptr, b_ptr, out_row, cnt_ptr, pid_n, rows, in_features, stride_wn, xs_row, ws_ptr,
                      stride_ws, scale_rows, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      K_TILES: tl.constexpr, ONE_STEP: tl.constexpr, FP8_W: tl.constexpr, GROUP: tl.constexpr,
                      INTERPRET: tl.constexpr):
    """Rows [pid_n BN, (pid_n + 1) BN) of x Wᵀ (+ bias) for one token, rounded into out_row (its dtype, as the
    matmul would have written them), then this program's arrival: a CTA barrier (every thread's stores before the
    release) and the counter's acq_rel add at GPU scope. Returns the count before this program's: the caller whose
    count completes its group is the last, and reads the others' rows (volatile loads) after resetting it.
    FP8_W: W is e4m3 with block scales ws [ceil(rows / scale_rows), G] (row stride stride_ws), x_row the quantized
    row and xs_row its group scales (`quant_row`); otherwise xs_row, ws_ptr, stride_ws and scale_rows are unread."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < rows
    y = gemv_rows(x_row, w_ptr, offs_n, n_ok, pid_n * BLOCK_N, in_features, stride_wn, xs_row, ws_ptr, stride_ws,
                  scale_rows, BLOCK_N, BLOCK_K, K_TILES, ONE_STEP, FP8_W, GROUP)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_row + offs_n, cast(y, out_row.dtype.element_ty, INTERPRET), mask=n_ok)
    tl.debug_barrier()  # every thread's stores before the release
    return tl.atomic_add(cnt_ptr, 1, sem="acq_rel")


@triton.jit
def gemv_rows(x_row, w_ptr, offs_n, n_ok, row0, in_features, stride_wn, xs_row, ws_ptr, stride_ws, scale_rows,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr, ONE_STEP: tl.constexpr,
              FP8_W: tl.constexpr, GROUP: tl.constexpr):
    """Rows offs_n of x Wᵀ for one token, fp32 [BN] (not rounded): the float walk, or (FP8_W) the e4m3 one, whose
    rows (from row0, a multiple of BN) share the scale row row0 // scale_rows (BN divides Bn)."""
    if FP8_W:
        ws_row = ws_ptr + (row0 // scale_rows).to(tl.int64) * stride_ws
        y = gemv_fp8_rows(x_row, w_ptr, offs_n, n_ok, in_features, stride_wn, xs_row, ws_row, BLOCK_N, BLOCK_K,
                          K_TILES, ONE_STEP, GROUP)
    else:
        offs_k = tl.arange(0, BLOCK_K)[None, :]
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc = gemv_row(acc, x_row, w_ptrs, n_ok[:, None], offs_k, in_features, BLOCK_K, K_TILES, ONE_STEP)
        y = tl.sum(acc, axis=1)
    return y


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


@triton.jit
def gemv_fp8_rows(xq_row, w_ptr, offs_n, n_ok, in_features, stride_wn, xs_row, ws_row, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, K_TILES: tl.constexpr, ONE_STEP: tl.constexpr, GROUP: tl.constexpr):
    """The FP8 form of a row block's products, summed per row (fp32 [BN]): a K tile is [BN, BK / INNER, INNER]
    (INNER = min(BK, Bk): one scale group a row of the middle axis), so each group's x scale and the rows' weight
    block scale are loaded once a group, [1, groups, 1], and folded into x's values; the products are then one FMA
    a value against the e4m3 weights, in the float GEMV's tile walk (kernels/triton_moe_fp8_tiny.py's gate-up GEMV
    does the same). A tile the float path's size in values: narrowing BK to one group halved the bytes a thread
    kept in flight at Qwen3's o_proj (compile_tiny --cases fused)."""
    INNER: tl.constexpr = min(BLOCK_K, GROUP)
    NG: tl.constexpr = BLOCK_K // INNER
    first = tl.arange(0, NG)[None, :, None] * INNER  # [1, NG, 1]: each group row's first column in the tile
    offs_k = first + tl.arange(0, INNER)[None, None, :]  # [1, NG, INNER]
    w_ptrs = w_ptr + offs_n[:, None, None].to(tl.int64) * stride_wn + offs_k
    row_ok = n_ok[:, None, None]
    acc = tl.zeros([BLOCK_N, NG, INNER], dtype=tl.float32)
    if ONE_STEP:
        acc = _fp8_tiles(acc, xq_row, xs_row, ws_row, w_ptrs, row_ok, offs_k, first, 0, in_features, BLOCK_K,
                         K_TILES, GROUP)
    else:
        for k0 in range(0, in_features, BLOCK_K * K_TILES):
            acc = _fp8_tiles(acc, xq_row, xs_row, ws_row, w_ptrs, row_ok, offs_k, first, k0, in_features, BLOCK_K,
                             K_TILES, GROUP)
    return tl.sum(tl.sum(acc, axis=2), axis=1)


@triton.jit
def _fp8_tiles(acc, xq_row, xs_row, ws_row, w_ptrs, row_ok, offs_k, first, k0, in_features, BLOCK_K: tl.constexpr,
               K_TILES: tl.constexpr, GROUP: tl.constexpr):
    """K_TILES FP8 tiles into acc [BN, NG, INNER], unrolled (gemv_tiles' reasons); x loaded in the weight tile's
    layout."""
    for i in tl.static_range(K_TILES):
        base = k0 + i * BLOCK_K
        k = base + offs_k
        w = tl.load(w_ptrs + base, mask=row_ok & (k < in_features), other=0.0)
        kb = k + tl.zeros(acc.shape, dtype=tl.int32)
        x = tl.load(xq_row + kb, mask=kb < in_features, other=0.0)
        grp = (base + first) // GROUP
        g_ok = base + first < in_features
        scale = tl.load(xs_row + grp, mask=g_ok, other=0.0) * tl.load(ws_row + grp, mask=g_ok, other=0.0)
        acc += w.to(tl.float32) * (x.to(tl.float32) * scale)
    return acc


def launch_shape(rows: int, in_features: int, widest: int, interp: bool, device, narrowest: int = 8,
                 itemsize: int = 2) -> tuple[int, int, int, bool, int]:
    """(BN, BK, K_TILES, ONE_STEP, num_warps) of a decode-batch GEMV over `rows` rows: the widest block (`widest`, a
    power of two the caller's grouping allows) that still gives every SM two programs at one token (the grid's rows
    are its bytes in flight), down to `narrowest`; then a [BN, BK] fp32 product tile of 4,096 values (32 registers a
    thread at 4 warps). ONE_STEP: the whole row in tiles of at most 32 kB a program with no loop (ptxas hoists a
    straight line's loads ahead of the products, not a runtime loop's), else steps of up to four tiles' loads (eight
    of an e4m3 weight's: DeepSeek-V3's FP8 shared expert kept 24 KB an SM in flight at four), 32 kB a program (two
    of a float32 weight's: `itemsize`); 64 kB straight-line spilled (compile_tiny --cases fused).
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
    return bn, bk, max(1, min(8 // min(itemsize, 2), whole, 32768 // (bn * bk * itemsize))), False, 4


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


def check_fp8_gemv_weight(name: str, w: torch.Tensor, w_scale_inv: torch.Tensor, shape: tuple[int, int],
                          block: tuple[int, int]) -> tuple[int, int]:
    """An FP8 weight of a fused GEMV: e4m3 [N, K] with float32 block scales, a block the Triton FP8 kernels take.
    Returns the block."""
    bn, bk = check_triton_block(block)
    if tuple(w.shape) != shape:
        raise ValueError(f"{name} {tuple(w.shape)} is invalid: must be {list(shape)}.")
    check_fp8_weight(name, w, w_scale_inv, (bn, bk))
    return bn, bk


def fp8_scratch(x_TK: torch.Tensor, w_scale_inv: torch.Tensor | None, block: tuple[int, int], interp: bool) -> tuple:
    """An FP8 GEMV launch's quantization arguments: (xq [T, K] e4m3 and xs [T, G] float32 scratch rows, the weight's
    scales, their row stride, Bn, G, QCHUNK, QCHUNKS: `quant_row`'s chunks, a multiple of Bk); placeholders for a
    float weight."""
    T, K = x_TK.shape
    if w_scale_inv is None:
        return x_TK, x_TK, x_TK, 0, 1, 0, 1, 1
    bk = block[1]
    groups = triton.cdiv(K, bk)
    qchunk = max(bk, min(triton.next_power_of_2(K), 64 if interp else 1024))  # a multiple of Bk (powers of two)
    w_scale_inv = w_scale_inv if w_scale_inv.stride(-1) == 1 else w_scale_inv.contiguous()
    return (common.workspace((T, K), FP8_DTYPE, x_TK.device), common.workspace((T, groups), torch.float32, x_TK.device),
            w_scale_inv, w_scale_inv.stride(0), block[0], groups, qchunk, triton.cdiv(K, qchunk))
