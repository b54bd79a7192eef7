"""Fused MoE experts in Triton: align → gate-up GEMM with the gated activation → down GEMM × routed weight → top-k sum.

Legend: T tokens, D hidden, E local experts, G global experts, I expert
intermediate size, F = 2I, K top-k, P = T*K pairs, R padded rows (moe_align).

Data flow (same math as `reference_fused_moe`):
1. `moe_align_block_size`: pair indices sorted by expert, each expert's run
   padded to BLOCK_M; one expert id per M block (-1: nothing to do).
2. Gate-up GEMM over blocks of sorted rows. A rows are gathered from x by
   `pair // K` (no permuted copy of the activations); each program keeps two
   accumulators, gate columns [n, n+BN) and up columns [I+n, I+n+BN), so
   SiLU(gate)·up happens in the epilogue and the [P, 2I] tensor never exists.
   The result h_RI is written in *sorted* row order, so the down GEMM reads
   contiguous rows.
3. Down GEMM: h_RI × w2[e]ᵀ, times the routed weight in the epilogue.
4. Top-k sum, by `combine`:
   - "sum" (default): the down GEMM writes one row per pair (y_PD, plain
     stores), then one pass adds each token's K rows in fp32. Deterministic:
     bit-identical outputs run to run, which the engine's reproducibility
     (seeded sampling, greedy parity) relies on. Costs one read of P·D.
   - "atomic": the down GEMM adds straight into an fp32 [T, D] buffer with
     atomics: no y_PD round trip, and for fp32 activations no pass at all
     after the GEMM (bf16/fp16 pay one cast). Summation order varies between
     runs (last-bit differences). benchmarks/moe_kernels.py measures both.
All accumulation is fp32 whatever the input dtype (fp32, bf16, fp16).
Expert biases (gpt-oss: b13 [E, F] on the gate-up GEMM, b2 [E, D] on the down GEMM, scaled by the routed
weight like the rest of the expert's output) and the activation (`MoEActivation`: SiLU·up, or gpt-oss's
clamped swiglu_oai) are constexpr switches of the epilogues: without biases the kernels load nothing more,
and the SiLU path compiles to the code it always did. `activation_epilogue` (in triton_common, shared with the
tiny path) and `_add_bias` are shared with the MXFP4 kernels (kernels/triton_moe_mxfp4.py).
Tiny batches (decode) skip all of the above when the launch config says so (`TINY`, kernels/moe_config.py):
kernels/triton_moe_tiny.py runs the layer in two launches (gate-up GEMV per pair, down GEMV with the top-k sum
per token), chosen from T*K alone, so CUDA graphs stay valid. `path` forces either path (benchmarks, tests).
The pair count is not specialised on (`do_not_specialize`): decode batches of odd and even sizes share
one compiled kernel per config (T*K % 16 would otherwise split them), so a new batch size never compiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from . import triton_moe_tiny
from .moe import SILU, MoEActivation
from .moe_align import _local_expert, moe_align_block_size
from .moe_config import DEFAULT_TINY, MoEConfig, get_moe_config
from .triton_common import activation_epilogue, cast, dot  # (activation_epilogue: shared with the tiny path)

ACT_SILU, ACT_SWIGLU_OAI = 0, 1  # the ACT constexpr of the gate-up epilogue
_ACT_CODES = {"silu": ACT_SILU, "swiglu_oai": ACT_SWIGLU_OAI}
_PATHS = ("auto", "tiny", "sorted")


@triton.jit
def _grouped_pids(num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # GROUP_M consecutive M blocks sweep the N blocks together, so the expert
    # weights they share stay in L2.
    pid = tl.program_id(0)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _add_bias(acc, b_ptr, offs_n, n_ok):
    """acc [BM, BN] + the bias row's [BN] slice, in fp32."""
    return acc + tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_up_kernel(x_ptr, w13_ptr, h_ptr, sorted_ptr, expert_ids_ptr, b13_ptr,
                   num_pairs, num_rows, inter, hidden, top_k,
                   stride_xt, stride_we, stride_wf, stride_wd, stride_hr, stride_be, alpha, limit,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   EVEN_K: tl.constexpr, FUSED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                   INTERPRET: tl.constexpr, PREC: tl.constexpr):
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
    a_ptrs = x_ptr + tok_m[:, None] * stride_xt + offs_k[None, :]
    w_ptr = w13_ptr + expert.to(tl.int64) * stride_we
    if FUSED:
        # One [BLOCK_K, 2*BLOCK_N] tile: column 2j is gate row n+j of w13, column 2j+1 up row I+n+j (each row
        # contiguous along D, so the interleave costs nothing at load), and one dot of N = 2*BLOCK_N: a wider
        # MMA (wgmma N up to 256) and one A operand in shared memory instead of two dots' worth.
        offs_2n = tl.arange(0, 2 * BLOCK_N)
        col_2n = pid_n * BLOCK_N + offs_2n // 2
        col_ok = col_2n < inter
        b_ptrs = w_ptr + (col_2n + (offs_2n % 2) * inter)[None, :].to(tl.int64) * stride_wf + offs_k[:, None] * stride_wd
        acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = offs_k < hidden - k0
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = dot(a, b, acc, INTERPRET, PREC)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_wd
        acc_g, acc_u = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N, 2]))
    else:
        g_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wf + offs_k[:, None] * stride_wd
        u_ptrs = g_ptrs + inter * stride_wf
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                bg = tl.load(g_ptrs, mask=n_ok[None, :], other=0.0)
                bu = tl.load(u_ptrs, mask=n_ok[None, :], other=0.0)
            else:
                k_ok = offs_k < hidden - k0
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                bg = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                bu = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc_g = dot(a, bg, acc_g, INTERPRET, PREC)
            acc_u = dot(a, bu, acc_u, INTERPRET, PREC)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K * stride_wd
            u_ptrs += BLOCK_K * stride_wd
    if HAS_BIAS:
        b_ptr = b13_ptr + expert.to(tl.int64) * stride_be
        acc_g = _add_bias(acc_g, b_ptr, offs_n, n_ok)
        acc_u = _add_bias(acc_u, b_ptr + inter, offs_n, n_ok)
    h = activation_epilogue(acc_g, acc_u, alpha, limit, ACT)
    h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hr + offs_n[None, :]
    tl.store(h_ptrs, cast(h, h_ptr.dtype.element_ty, INTERPRET), mask=n_ok[None, :])


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_down_kernel(h_ptr, w2_ptr, y_ptr, sorted_ptr, expert_ids_ptr, weights_ptr, b2_ptr,
                     num_pairs, num_rows, hidden, inter, top_k,
                     stride_hr, stride_we, stride_wd, stride_wi, stride_yr, stride_be,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     EVEN_K: tl.constexpr, ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr,
                     PREC: tl.constexpr):
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
    a_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hr + offs_k[None, :]
    b_ptrs = (w2_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :].to(tl.int64) * stride_wd
              + offs_k[:, None] * stride_wi)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < inter - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = dot(a, b, acc, INTERPRET, PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wi
    if HAS_BIAS:  # before the routed weight: it scales the bias too
        acc = _add_bias(acc, b2_ptr + expert.to(tl.int64) * stride_be, offs_n, n_ok)
    w_m = tl.load(weights_ptr + pair_m, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * w_m[:, None]
    mask = row_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tok_m = (pair_m // top_k).to(tl.int64)
        # relaxed: nothing reads these sums before the kernel ends, so no ordering is needed
        # (the default acq_rel atomic returns a value; relaxed lowers to a fire-and-forget red).
        tl.atomic_add(y_ptr + tok_m[:, None] * stride_yr + offs_n[None, :], acc, mask=mask, sem="relaxed")
    else:
        y_ptrs = y_ptr + pair_m[:, None].to(tl.int64) * stride_yr + offs_n[None, :]
        tl.store(y_ptrs, cast(acc, y_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_sum_kernel(y_ptr, ids_ptr, map_ptr, out_ptr, num_pairs, num_ids, hidden, top_k, stride_yr, stride_ot,
                    BLOCK_D: tl.constexpr, HAS_MAP: tl.constexpr, INTERPRET: tl.constexpr):
    # Pairs that no local expert computed were never written: skip them, do not read them.
    t = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < hidden
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in range(0, top_k):
        pair = t * top_k + k
        local = _local_expert(ids_ptr, map_ptr, pair, num_pairs, num_ids, HAS_MAP)
        # (broadcast before `&`: the interpreter rejects a scalar-and-vector mask)
        ok = d_ok & ((tl.zeros([BLOCK_D], dtype=tl.int32) + local) >= 0)
        y = tl.load(y_ptr + pair.to(tl.int64) * stride_yr + offs_d, mask=ok, other=0.0)
        acc += y.to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + offs_d, cast(acc, out_ptr.dtype.element_ty, INTERPRET), mask=d_ok)


def check_bias(name: str, b: torch.Tensor | None, rows: int, cols: int) -> torch.Tensor | None:
    """None, or the bias [rows, cols] (any float dtype) with contiguous rows; anything else is named."""
    if b is None:
        return None
    if not b.dtype.is_floating_point or tuple(b.shape) != (rows, cols):
        raise ValueError(f"{name} {tuple(b.shape)} {b.dtype} is invalid: must be a float tensor [{rows}, {cols}].")
    return b if b.stride(-1) == 1 else b.contiguous()


def activation_args(activation: MoEActivation) -> tuple[int, float, float]:
    """(ACT constexpr, alpha, limit) for `activation_epilogue`."""
    if not isinstance(activation, MoEActivation):
        raise ValueError(f"activation={activation!r} is invalid: must be a moelink.kernels.moe.MoEActivation.")
    return _ACT_CODES[activation.kind], float(activation.alpha), float(activation.limit)


def _check(x_TD, w13_EFD, w2_EDI, topk_weights_TK, topk_ids_TK) -> None:
    common.check_dtype("x_TD", x_TD)
    if w13_EFD.dtype != x_TD.dtype or w2_EDI.dtype != x_TD.dtype:
        raise ValueError(f"expert weights are {w13_EFD.dtype}/{w2_EDI.dtype}: they must match x_TD.dtype={x_TD.dtype}.")
    E, F, D = w13_EFD.shape
    if F % 2 or x_TD.shape[1] != D or tuple(w2_EDI.shape) != (E, D, F // 2):
        raise ValueError(f"shapes x_TD={tuple(x_TD.shape)}, w13_EFD={tuple(w13_EFD.shape)}, w2_EDI={tuple(w2_EDI.shape)} "
                         "do not fit: need w13 [E, 2I, D] and w2 [E, D, I].")
    if topk_ids_TK.shape != topk_weights_TK.shape or topk_ids_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"topk_ids_TK {tuple(topk_ids_TK.shape)} and topk_weights_TK {tuple(topk_weights_TK.shape)} "
                         f"must both be [T, K] with T={x_TD.shape[0]}.")


def triton_fused_moe(
    x_TD: torch.Tensor,
    w13_EFD: torch.Tensor,
    w2_EDI: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    expert_map_G: torch.Tensor | None = None,
    *,
    b13_EF: torch.Tensor | None = None,
    b2_ED: torch.Tensor | None = None,
    activation: MoEActivation = SILU,
    out: torch.Tensor | None = None,
    config: MoEConfig | None = None,
    combine: str = "sum",
    path: str = "auto",
) -> torch.Tensor:
    """Same contract as `reference_fused_moe` (biases b13 [E, F] / b2 [E, D] of any float dtype, activation):
    [T, D] in x's dtype; rows whose experts are all remote are 0.

    `out` (optional [T, D], x's dtype) receives the result; `config` overrides
    the JSON launch config; `combine` is "sum" or "atomic" (module docstring); `path` is "auto" (the
    config's TINY.max_pairs decides), "tiny" (always the two-launch tiny path; the config's TINY blocks, else
    DEFAULT_TINY's; it sums deterministically whatever `combine` says) or "sorted" (never the tiny path).
    No device→host sync: grids come from shapes only.
    """
    _check(x_TD, w13_EFD, w2_EDI, topk_weights_TK, topk_ids_TK)
    if combine not in ("sum", "atomic"):
        raise ValueError(f"combine={combine!r} is invalid: must be 'sum' or 'atomic'.")
    if path not in _PATHS:
        raise ValueError(f"path={path!r} is invalid: must be one of {', '.join(_PATHS)}.")
    T, D = x_TD.shape
    E, F, _ = w13_EFD.shape
    I, K = F // 2, topk_ids_TK.shape[1]
    b13_EF, b2_ED = check_bias("b13_EF", b13_EF, E, F), check_bias("b2_ED", b2_ED, E, D)
    act, alpha, limit = activation_args(activation)
    dev, dt = x_TD.device, x_TD.dtype
    if out is None:
        out = common.workspace((T, D), dt, dev)
    elif out.shape != x_TD.shape or out.dtype != dt or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} is invalid: must be [T, D] = {tuple(x_TD.shape)}, {dt}, rows contiguous.")
    if T == 0:
        return out
    x_TD, w13_EFD, w2_EDI = (t if t.stride(-1) == 1 else t.contiguous() for t in (x_TD, w13_EFD, w2_EDI))
    weights_P = topk_weights_TK.reshape(-1).contiguous()
    ids_P = topk_ids_TK.reshape(-1).contiguous()
    cfg = config or get_moe_config(E, I, T, K, dev)
    if path == "tiny" or (path == "auto" and cfg.uses_tiny(T * K)):
        return triton_moe_tiny.tiny_fused_moe(x_TD, w13_EFD, w2_EDI, weights_P, ids_P, expert_map_G, b13_EF, b2_ED, act,
                                              alpha, limit, out, cfg.tiny or DEFAULT_TINY, K)
    BM = cfg.BLOCK_SIZE_M
    sorted_R, expert_ids_B, _ = moe_align_block_size(ids_P, BM, E, expert_map_G)
    R = sorted_R.numel()
    P = ids_P.numel()
    interp = common.interpreting(x_TD)
    flags = dict(INTERPRET=interp, PREC=common.dot_precision(dt))

    up = cfg.up
    h_RI = common.workspace((R, I), dt, dev)
    _moe_up_kernel[(R // BM * triton.cdiv(I, up.BLOCK_SIZE_N),)](
        x_TD, w13_EFD, h_RI, sorted_R, expert_ids_B, x_TD if b13_EF is None else b13_EF, P, R, I, D, K,
        x_TD.stride(0), w13_EFD.stride(0), w13_EFD.stride(1), w13_EFD.stride(2), h_RI.stride(0),
        0 if b13_EF is None else b13_EF.stride(0), alpha, limit,
        BLOCK_M=BM, BLOCK_N=up.BLOCK_SIZE_N, BLOCK_K=up.BLOCK_SIZE_K, GROUP_M=up.GROUP_SIZE_M,
        EVEN_K=D % up.BLOCK_SIZE_K == 0, FUSED=up.FUSED_GATE_UP, HAS_BIAS=b13_EF is not None, ACT=act,
        num_warps=up.num_warps, num_stages=up.num_stages, **flags,
    )

    down = cfg.down
    atomic = combine == "atomic"
    if atomic:
        y = out if (dt == torch.float32 and out.is_contiguous()) else common.workspace((T, D), torch.float32, dev)
        y.zero_()
    else:
        y = common.workspace((P, D), dt, dev)
    _moe_down_kernel[(R // BM * triton.cdiv(D, down.BLOCK_SIZE_N),)](
        h_RI, w2_EDI, y, sorted_R, expert_ids_B, weights_P, weights_P if b2_ED is None else b2_ED, P, R, D, I, K,
        h_RI.stride(0), w2_EDI.stride(0), w2_EDI.stride(1), w2_EDI.stride(2), y.stride(0),
        0 if b2_ED is None else b2_ED.stride(0),
        BLOCK_M=BM, BLOCK_N=down.BLOCK_SIZE_N, BLOCK_K=down.BLOCK_SIZE_K, GROUP_M=down.GROUP_SIZE_M,
        EVEN_K=I % down.BLOCK_SIZE_K == 0, ATOMIC=atomic, HAS_BIAS=b2_ED is not None, num_warps=down.num_warps,
        num_stages=down.num_stages, **flags,
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
