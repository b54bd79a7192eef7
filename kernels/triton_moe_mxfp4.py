"""Fused MoE with MXFP4 expert weights (gpt-oss) in Triton: the float fused MoE (kernels/triton_moe.py) whose B tiles
are dequantized in the K loop.

Legend: T tokens, D hidden, E local experts, G global experts, I expert intermediate size, F = 2I, K top-k,
P = T*K pairs, R padded rows (moe_align), S = reduction dim / 32 scale groups, Q = 16 packed bytes per group.

Weights (kernels/mxfp4.py, the published layout with gate/up rows de-interleaved at load): w13 blocks
[E, F, D/32, 16] uint8 + scales [E, F, D/32] uint8; w2 blocks [E, D, I/32, 16] + scales [E, D, I/32]. A row's
bytes are contiguous along the reduction dim, so a [BLOCK_N, BLOCK_K/2] byte tile and its [BLOCK_N, BLOCK_K/32]
E8M0 scales are plain strided loads: a quarter of the bytes a bf16 tile costs (plus 1/32 for the scales).

In the K loop (Hopper and older, `NATIVE=False`): bytes → two nibbles (low nibble = even element) → e2m1 value
built in fp32 bits → times 2**(scale - 127) (also built from bits) → the activation dtype, exact (an e2m1 value
times a power of two needs 2 significant bits) unless it over/underflows that dtype → tl.dot with fp32
accumulation, as the float kernel. The activations stay in their dtype (W4A16); x is never quantized.
`NATIVE=True` (opt-in, `native=True`; bf16/fp16 activations): `tl.dot_scaled(x, None, "bf16", packed, scales,
"e2m1")` instead, Triton's own microscaling path. Verified: it matches the reference in the interpreter (same
operand layouts: bytes packed along K, scales [N, K/32]), and compiles for sm_100 (Triton 3.6 and 3.9, offline) to
`tcgen05.mma ... kind::f16`: with bf16 activations Triton upcasts the e2m1 operand and runs Blackwell's bf16 MMA,
not the block-scaled `kind::mxf8f6f4` / `kind::mxf4` MMA, which needs both operands microscaled (activations
quantized to MXFP8/MXFP4, a numerics change not made here). Not run on Blackwell hardware, hence opt-in.

The rest is the float kernel's: moe_align, gather of x rows by pair // K, [gate; up] accumulators with biases
and the activation (`activation_epilogue`) in the epilogue, h_RI in sorted order, the down GEMM times the
routed weight, and the deterministic top-k sum (`_moe_sum_kernel`) or fp32 atomics.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .moe import SILU, MoEActivation
from .moe_align import moe_align_block_size
from .moe_config import MoELaunchConfig, get_moe_config
from .mxfp4 import GROUP, _check_packed
from .triton_common import cast, dot
from .triton_moe import _add_bias, _grouped_pids, _moe_sum_kernel, activation_args, activation_epilogue, check_bias

_NATIVE_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


@triton.jit
def _e8m0_to_fp32(s):
    # 2**(s - 127) from its bits; s = 0 is 2**-127, a float32 subnormal (mantissa bit 22), not 0.
    s = s.to(tl.int32)
    return tl.where(s == 0, 0x00400000, s << 23).to(tl.float32, bitcast=True)


@triton.jit
def dequant_tile(q, s, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, dtype: tl.constexpr):
    """Packed e2m1 bytes q [BN, BK/2] (uint8) + E8M0 scales s [BN, BK/32] (uint8) -> the [BK, BN] B tile in dtype."""
    q = q.to(tl.int32)
    c = tl.reshape(tl.join(q & 0xF, q >> 4), [BLOCK_N, BLOCK_K])  # low nibble = even element
    mag = c & 7  # exponent bits 2-1, mantissa bit 0
    # e2m1 -> fp32 bits: exponent e + 126, mantissa bit m at bit 22 (so mag << 22 + 126 << 23) for e > 0;
    # the subnormal code 1 is 0.5 = 126 << 23, code 0 is 0.
    bits = tl.where(mag >= 2, (mag << 22) + 0x3F000000, tl.where(mag == 1, 0x3F000000, 0)) | ((c & 8) << 28)
    v = tl.reshape(bits.to(tl.float32, bitcast=True), [BLOCK_N, BLOCK_K // 32, 32])
    w = tl.reshape(v * _e8m0_to_fp32(s)[:, :, None], [BLOCK_N, BLOCK_K])
    return tl.trans(w.to(dtype))


@triton.jit
def _mxfp4_dot(a, q, s, acc, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NATIVE: tl.constexpr,
               A_FORMAT: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    if NATIVE:
        return tl.dot_scaled(a, None, A_FORMAT, tl.trans(q), s, "e2m1", acc)
    return dot(a, dequant_tile(q, s, BLOCK_N, BLOCK_K, a.dtype), acc, INTERPRET, PREC)


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_mxfp4_up_kernel(x_ptr, wq_ptr, ws_ptr, h_ptr, sorted_ptr, expert_ids_ptr, b13_ptr,
                         num_pairs, num_rows, inter, hidden, top_k,
                         stride_xt, stride_qe, stride_qf, stride_se, stride_sf, stride_ss, stride_hr, stride_be,
                         alpha, limit,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, NATIVE: tl.constexpr,
                         A_FORMAT: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    pid_m, pid_n = _grouped_pids(num_rows // BLOCK_M, tl.cdiv(inter, BLOCK_N), GROUP_M)
    expert = tl.load(expert_ids_ptr + pid_m)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair_m = tl.load(sorted_ptr + offs_m)
    row_ok = pair_m < num_pairs
    tok_m = (pair_m // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    offs_kq = tl.arange(0, BLOCK_K // 2)  # bytes
    offs_ks = tl.arange(0, BLOCK_K // 32)  # scale groups
    a_ptrs = x_ptr + tok_m[:, None] * stride_xt + offs_k[None, :]
    rows_n = offs_n.to(tl.int64)
    gq_ptrs = wq_ptr + expert.to(tl.int64) * stride_qe + rows_n[:, None] * stride_qf + offs_kq[None, :]
    gs_ptrs = ws_ptr + expert.to(tl.int64) * stride_se + rows_n[:, None] * stride_sf + offs_ks[None, :] * stride_ss
    uq_ptrs = gq_ptrs + inter * stride_qf
    us_ptrs = gs_ptrs + inter * stride_sf
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            qg = tl.load(gq_ptrs, mask=n_ok[:, None], other=0)
            sg = tl.load(gs_ptrs, mask=n_ok[:, None], other=0)
            qu = tl.load(uq_ptrs, mask=n_ok[:, None], other=0)
            su = tl.load(us_ptrs, mask=n_ok[:, None], other=0)
        else:  # the reduction dim is a multiple of 32 (one scale group), not of BLOCK_K
            k_ok = offs_k < hidden - k0
            kq_ok = offs_kq < (hidden - k0) // 2
            ks_ok = offs_ks < (hidden - k0) // 32
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            qg = tl.load(gq_ptrs, mask=n_ok[:, None] & kq_ok[None, :], other=0)
            sg = tl.load(gs_ptrs, mask=n_ok[:, None] & ks_ok[None, :], other=0)
            qu = tl.load(uq_ptrs, mask=n_ok[:, None] & kq_ok[None, :], other=0)
            su = tl.load(us_ptrs, mask=n_ok[:, None] & ks_ok[None, :], other=0)
        acc_g = _mxfp4_dot(a, qg, sg, acc_g, BLOCK_N, BLOCK_K, NATIVE, A_FORMAT, INTERPRET, PREC)
        acc_u = _mxfp4_dot(a, qu, su, acc_u, BLOCK_N, BLOCK_K, NATIVE, A_FORMAT, INTERPRET, PREC)
        a_ptrs += BLOCK_K
        gq_ptrs += BLOCK_K // 2
        uq_ptrs += BLOCK_K // 2
        gs_ptrs += (BLOCK_K // 32) * stride_ss
        us_ptrs += (BLOCK_K // 32) * stride_ss
    if HAS_BIAS:
        b_ptr = b13_ptr + expert.to(tl.int64) * stride_be
        acc_g = _add_bias(acc_g, b_ptr, offs_n, n_ok)
        acc_u = _add_bias(acc_u, b_ptr + inter, offs_n, n_ok)
    h = activation_epilogue(acc_g, acc_u, alpha, limit, ACT)
    h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hr + offs_n[None, :]
    tl.store(h_ptrs, cast(h, h_ptr.dtype.element_ty, INTERPRET), mask=n_ok[None, :])


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_mxfp4_down_kernel(h_ptr, wq_ptr, ws_ptr, y_ptr, sorted_ptr, expert_ids_ptr, weights_ptr, b2_ptr,
                           num_pairs, num_rows, hidden, inter, top_k,
                           stride_hr, stride_qe, stride_qd, stride_se, stride_sd, stride_ss, stride_yr, stride_be,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                           EVEN_K: tl.constexpr, ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr, NATIVE: tl.constexpr,
                           A_FORMAT: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    pid_m, pid_n = _grouped_pids(num_rows // BLOCK_M, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    expert = tl.load(expert_ids_ptr + pid_m)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair_m = tl.load(sorted_ptr + offs_m)
    row_ok = pair_m < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    offs_kq = tl.arange(0, BLOCK_K // 2)
    offs_ks = tl.arange(0, BLOCK_K // 32)
    a_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hr + offs_k[None, :]
    rows_n = offs_n.to(tl.int64)
    q_ptrs = wq_ptr + expert.to(tl.int64) * stride_qe + rows_n[:, None] * stride_qd + offs_kq[None, :]
    s_ptrs = ws_ptr + expert.to(tl.int64) * stride_se + rows_n[:, None] * stride_sd + offs_ks[None, :] * stride_ss
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            q = tl.load(q_ptrs, mask=n_ok[:, None], other=0)
            s = tl.load(s_ptrs, mask=n_ok[:, None], other=0)
        else:
            k_ok = offs_k < inter - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            q = tl.load(q_ptrs, mask=n_ok[:, None] & (offs_kq < (inter - k0) // 2)[None, :], other=0)
            s = tl.load(s_ptrs, mask=n_ok[:, None] & (offs_ks < (inter - k0) // 32)[None, :], other=0)
        acc = _mxfp4_dot(a, q, s, acc, BLOCK_N, BLOCK_K, NATIVE, A_FORMAT, INTERPRET, PREC)
        a_ptrs += BLOCK_K
        q_ptrs += BLOCK_K // 2
        s_ptrs += (BLOCK_K // 32) * stride_ss
    if HAS_BIAS:  # before the routed weight: it scales the bias too
        acc = _add_bias(acc, b2_ptr + expert.to(tl.int64) * stride_be, offs_n, n_ok)
    w_m = tl.load(weights_ptr + pair_m, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * w_m[:, None]
    mask = row_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tok_m = (pair_m // top_k).to(tl.int64)
        tl.atomic_add(y_ptr + tok_m[:, None] * stride_yr + offs_n[None, :], acc, mask=mask, sem="relaxed")
    else:
        y_ptrs = y_ptr + pair_m[:, None].to(tl.int64) * stride_yr + offs_n[None, :]
        tl.store(y_ptrs, cast(acc, y_ptr.dtype.element_ty, INTERPRET), mask=mask)


def _bytes_view(blocks: torch.Tensor) -> torch.Tensor:
    """[E, N, S, 16] -> [E, N, S*16] bytes with the last dim contiguous (a view when the blocks are contiguous)."""
    E, N, S, Q = blocks.shape
    if blocks.stride(-1) != 1 or blocks.stride(-2) != Q:
        blocks = blocks.contiguous()
    return blocks.view(E, N, S * Q) if blocks.stride(1) == S * Q else blocks.reshape(E, N, S * Q)


def mxfp4_config(cfg: MoELaunchConfig) -> MoELaunchConfig:
    """The float kernel's launch config with BLOCK_SIZE_K at least one scale group (32); FUSED_GATE_UP is
    ignored here (two dots, one per half)."""
    return MoELaunchConfig(cfg.BLOCK_SIZE_M, replace(cfg.up, BLOCK_SIZE_K=max(GROUP, cfg.up.BLOCK_SIZE_K), FUSED_GATE_UP=False),
                     replace(cfg.down, BLOCK_SIZE_K=max(GROUP, cfg.down.BLOCK_SIZE_K)))


def _check(x_TD, w13_blocks, w13_scales, w2_blocks, w2_scales, topk_weights_TK, topk_ids_TK) -> tuple[int, int, int]:
    common.check_dtype("x_TD", x_TD)
    _check_packed(w13_blocks, w13_scales, "w13")
    _check_packed(w2_blocks, w2_scales, "w2")
    if w13_blocks.dim() != 4 or w2_blocks.dim() != 4:
        raise ValueError(f"w13 blocks {tuple(w13_blocks.shape)} / w2 blocks {tuple(w2_blocks.shape)} are invalid: "
                         "need [E, F, D/32, 16] and [E, D, I/32, 16].")
    E, F, S13, _ = w13_blocks.shape
    D = x_TD.shape[1]
    if F % 2 or S13 * GROUP != D or tuple(w2_blocks.shape[:3]) != (E, D, F // 2 // GROUP) or (F // 2) % GROUP:
        raise ValueError(f"shapes x_TD={tuple(x_TD.shape)}, w13 blocks={tuple(w13_blocks.shape)}, w2 blocks="
                         f"{tuple(w2_blocks.shape)} do not fit: need w13 [E, 2I, D/32, 16] and w2 [E, D, I/32, 16] "
                         "with D and I multiples of 32.")
    if topk_ids_TK.shape != topk_weights_TK.shape or topk_ids_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"topk_ids_TK {tuple(topk_ids_TK.shape)} and topk_weights_TK {tuple(topk_weights_TK.shape)} "
                         f"must both be [T, K] with T={x_TD.shape[0]}.")
    return E, F // 2, D


def triton_fused_moe_mxfp4(
    x_TD: torch.Tensor,
    w13_blocks_EFSQ: torch.Tensor,
    w13_scales_EFS: torch.Tensor,
    w2_blocks_EDSQ: torch.Tensor,
    w2_scales_EDS: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    expert_map_G: torch.Tensor | None = None,
    *,
    b13_EF: torch.Tensor | None = None,
    b2_ED: torch.Tensor | None = None,
    activation: MoEActivation = SILU,
    out: torch.Tensor | None = None,
    config: MoELaunchConfig | None = None,
    combine: str = "sum",
    native: bool = False,
) -> torch.Tensor:
    """Same contract as `reference_fused_moe_mxfp4`: [T, D] in x's dtype (fp32, bf16, fp16); rows whose
    experts are all remote are 0. `out`, `config` and `combine` as `triton_fused_moe`; `native=True` takes the
    tl.dot_scaled path (module docstring; bf16/fp16 activations only). No device→host sync.
    """
    E, I, D = _check(x_TD, w13_blocks_EFSQ, w13_scales_EFS, w2_blocks_EDSQ, w2_scales_EDS, topk_weights_TK,
                     topk_ids_TK)
    if combine not in ("sum", "atomic"):
        raise ValueError(f"combine={combine!r} is invalid: must be 'sum' or 'atomic'.")
    F = 2 * I
    b13_EF, b2_ED = check_bias("b13_EF", b13_EF, E, F), check_bias("b2_ED", b2_ED, E, D)
    act, alpha, limit = activation_args(activation)
    T, K = x_TD.shape[0], topk_ids_TK.shape[1]
    dev, dt = x_TD.device, x_TD.dtype
    if native and dt not in _NATIVE_DTYPES:
        raise ValueError(f"native=True is invalid with x_TD.dtype={dt}: tl.dot_scaled takes bf16 or fp16 activations.")
    if out is None:
        out = common.workspace((T, D), dt, dev)
    elif out.shape != x_TD.shape or out.dtype != dt or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} is invalid: must be [T, D] = {tuple(x_TD.shape)}, {dt}, rows contiguous.")
    if T == 0:
        return out
    x_TD = x_TD if x_TD.stride(-1) == 1 else x_TD.contiguous()
    w13q, w2q = _bytes_view(w13_blocks_EFSQ), _bytes_view(w2_blocks_EDSQ)
    w13s, w2s = w13_scales_EFS, w2_scales_EDS
    weights_P = topk_weights_TK.reshape(-1).contiguous()
    ids_P = topk_ids_TK.reshape(-1).contiguous()
    cfg = mxfp4_config(config or get_moe_config(E, I, T, K, dev))
    BM = cfg.BLOCK_SIZE_M
    sorted_R, expert_ids_B, _ = moe_align_block_size(ids_P, BM, E, expert_map_G)
    R, P = sorted_R.numel(), ids_P.numel()
    interp = common.interpreting(x_TD)
    flags = dict(NATIVE=bool(native), A_FORMAT=_NATIVE_DTYPES.get(dt, "bf16"), INTERPRET=interp,
                 PREC=common.dot_precision(dt))

    up = cfg.up
    h_RI = common.workspace((R, I), dt, dev)
    _moe_mxfp4_up_kernel[(R // BM * triton.cdiv(I, up.BLOCK_SIZE_N),)](
        x_TD, w13q, w13s, h_RI, sorted_R, expert_ids_B, x_TD if b13_EF is None else b13_EF, P, R, I, D, K,
        x_TD.stride(0), w13q.stride(0), w13q.stride(1), w13s.stride(0), w13s.stride(1), w13s.stride(2), h_RI.stride(0),
        0 if b13_EF is None else b13_EF.stride(0), alpha, limit,
        BLOCK_M=BM, BLOCK_N=up.BLOCK_SIZE_N, BLOCK_K=up.BLOCK_SIZE_K, GROUP_M=up.GROUP_SIZE_M,
        EVEN_K=D % up.BLOCK_SIZE_K == 0, HAS_BIAS=b13_EF is not None, ACT=act,
        num_warps=up.num_warps, num_stages=up.num_stages, **flags,
    )

    down = cfg.down
    atomic = combine == "atomic"
    if atomic:
        y = out if (dt == torch.float32 and out.is_contiguous()) else common.workspace((T, D), torch.float32, dev)
        y.zero_()
    else:
        y = common.workspace((P, D), dt, dev)
    _moe_mxfp4_down_kernel[(R // BM * triton.cdiv(D, down.BLOCK_SIZE_N),)](
        h_RI, w2q, w2s, y, sorted_R, expert_ids_B, weights_P, weights_P if b2_ED is None else b2_ED, P, R, D, I, K,
        h_RI.stride(0), w2q.stride(0), w2q.stride(1), w2s.stride(0), w2s.stride(1), w2s.stride(2), y.stride(0),
        0 if b2_ED is None else b2_ED.stride(0),
        BLOCK_M=BM, BLOCK_N=down.BLOCK_SIZE_N, BLOCK_K=down.BLOCK_SIZE_K, GROUP_M=down.GROUP_SIZE_M,
        EVEN_K=I % down.BLOCK_SIZE_K == 0, ATOMIC=atomic, HAS_BIAS=b2_ED is not None,
        num_warps=down.num_warps, num_stages=down.num_stages, **flags,
    )
    if atomic:
        if y is not out:
            out.copy_(y)
        return out
    has_map = expert_map_G is not None
    BLOCK_D = min(1024, triton.next_power_of_2(D))
    _moe_sum_kernel[(T, triton.cdiv(D, BLOCK_D))](
        y, ids_P, expert_map_G if has_map else ids_P, out, P, expert_map_G.numel() if has_map else E, D, K,
        y.stride(0), out.stride(0),
        BLOCK_D=BLOCK_D, HAS_MAP=has_map, INTERPRET=interp, num_warps=4,
    )
    return out
