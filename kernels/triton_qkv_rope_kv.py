"""A decode step's GQA attention input in one launch: the residual add and input RMSNorm, the stacked q/k/v
projection, the per-head q/k norm, rotary and the paged-KV write (kernels/rotary.py's reference_norm_qkv_rope_kv
is the contract: add_rms_norm, the linear, rope_write_kv).

Legend: T tokens, D hidden, N query heads, K kv heads, H head dim, Hv value head dim, Q = N H, R = Q + K H + K Hv
projection rows, BN rows a program, G = N + K head groups (a query head; a kv head's k and v rows).

Why: at batch 1 the attention half of a decode layer was four dependent launches before attention (the norm, the
projection's GEMV, the q/k norm + rotary + KV write), each waiting for the one before, each paying its ramp and its
tail, for ~21 MB of weight reads (Qwen3-30B-A3B: ~4.4 us at an H200's copy bandwidth) around ~10 kB of
activations. Here one launch reads the weight once and nothing waits between the parts.

How, grid (T, R / BN), program (t, n):
1. token t's residual sum x + residual (rounded, as torch adds; written once, by the programs of block 0), its
   mean square in fp32 (the row's loads unrolled: one L2 round trip), and its normed row h, bit for bit
   kernels/triton_norm.py's output, written to h_TD by every program of the token (the same bytes: a benign
   race; each reads the row back in the GEMV's layout after a CTA barrier, so whichever program's bytes it reads,
   they are its own values);
2. rows [n BN, (n + 1) BN) of the projection for token t, kernels/triton_gemv.py's CUDA-core GEMV over h (no
   arithmetic between its loads: the norm inside the tiles kept ptxas from issuing a tile's loads before the one
   before was consumed); the rows' outputs (+ bias) rounded into qkv_TR, the projection's output a separate
   linear would have written;
3. the last-arriving program of a head group (a per-group counter: each program adds one after its rows are
   stored; the one that reads T x blocks-in-group - 1 is last and sets it back to zero, so the counters stay zero
   between launches and a CUDA graph replays them) runs the group's epilogue for every token: kernels/
   triton_rope_kv.py's rope_kv_head, the same code as the unfused op, reading q / k / v from qkv_TR past L1.
BN divides H and Hv so that no block straddles two groups.

Numerics: the norm and the epilogue are the unfused kernels' bit for bit; the projection sums each row's products
in its own fixed order (the program's tile order), so a token's outputs do not depend on the batch (the
batch-invariant mode's property) but may differ from cuBLAS's GEMV by an ulp of the activation dtype, as any
two GEMMs do. The mean square's fp32 sum is chunked here and whole-row in the norm kernel: at most an ulp of fp32
before the rounding (the norm kernel and torch differ the same way).

Memory order of step 3: a program's stores, a CTA barrier, then the counter's atomic add (acq_rel, GPU scope): the
last program's acquire sees every other program's released stores, and it reads them with volatile loads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .attention import FP8_CACHE_DTYPES
from .attention_input import block_rows, fused
from .fp8 import DEFAULT_BLOCK, FP8_DTYPE, fp8_gemv_rows
from .triton_gemv import (check_fp8_gemv_weight, gemv_block_arrive, launch_shape, normed,
                          quant_chunk, summed)
from .triton_norm import inverse_rms
from .triton_rope_kv import check_rope_kv, rope_kv_head, triton_rope_write_kv

@triton.jit
def _normed_row(x_row, r_row, nw_ptr, sum_row, h_row, xs_row, hidden, eps, write_sum, HAS_RES: tl.constexpr,
                CHUNK: tl.constexpr, CHUNKS: tl.constexpr, FP8_W: tl.constexpr, GROUP: tl.constexpr,
                INTERPRET: tl.constexpr):
    """The token's residual sum s (written when `write_sum`: one program of the token), its mean square, and norm(s)
    written to h_row, bit for bit kernels/triton_norm.py's output: every program of the token writes the same
    bytes (a benign race), and the barrier at the end makes its own threads' stores visible to the GEMV's layout. The CHUNKS loads are unrolled (static_range):
    one L2 round trip for the row. The GEMV then streams h like any input, with no arithmetic between its loads
    (the norm inside the GEMV's tiles kept ptxas from issuing a tile's loads before the one before was used).
    FP8_W: the normed row is quantized per GROUP columns as it is made (CHUNK a multiple of GROUP), h_row then the
    e4m3 row and xs_row its scales (triton_gemv.quant_chunk)."""
    offs_k = tl.arange(0, CHUNK)
    ssq_k = tl.zeros([CHUNK], dtype=tl.float32)
    for c in tl.static_range(CHUNKS):
        k = c * CHUNK + offs_k
        ok = k < hidden
        s = summed(x_row, r_row, k, ok, HAS_RES, INTERPRET)
        if write_sum:  # (a runtime branch)
            tl.store(sum_row + k, s, mask=ok)
        s32 = s.to(tl.float32)
        ssq_k += s32 * s32
    inv = inverse_rms(tl.sum(ssq_k, axis=0), hidden, eps)
    for c in tl.static_range(CHUNKS):
        k = c * CHUNK + offs_k
        ok = k < hidden
        s = summed(x_row, r_row, k, ok, HAS_RES, INTERPRET)
        h = normed(s, inv, tl.load(nw_ptr + k, mask=ok, other=0.0), x_row.dtype.element_ty, INTERPRET)
        if FP8_W:
            quant_chunk(h, h_row, xs_row, c * CHUNK, hidden, CHUNK, GROUP, INTERPRET)
        else:
            tl.store(h_row + k, h, mask=ok)
    tl.debug_barrier()  # the h row's stores before any thread reads them in the GEMV's layout


@triton.jit
def _group(r0, num_q_heads, num_kv_heads, head_dim, v_head_dim, BLOCK_N: tl.constexpr):
    """(head group, programs a token in it) of the block starting at projection row r0."""
    q_rows = num_q_heads * head_dim
    k_end = q_rows + num_kv_heads * head_dim
    kv_blocks = (head_dim + v_head_dim) // BLOCK_N
    if r0 < q_rows:
        return r0 // head_dim, head_dim // BLOCK_N
    if r0 < k_end:
        return num_q_heads + (r0 - q_rows) // head_dim, kv_blocks
    return num_q_heads + (r0 - k_end) // v_head_dim, kv_blocks


@triton.jit(do_not_specialize=["T"])
def _norm_qkv_kernel(x_ptr, res_ptr, nw_ptr, w_ptr, b_ptr, qkv_ptr, sum_ptr, h_ptr, cnt_ptr,
                     pos_ptr, cs_ptr, qn_ptr, kn_ptr, qo_ptr, kc_ptr, vc_ptr, slot_ptr,
                     T, hidden, rows, stride_xt, stride_rt, stride_wn, stride_cs,
                     num_q_heads, num_kv_heads, head_dim, v_head_dim, half, eps, qk_eps, k_scale, v_scale,
                     xs_ptr, ws_ptr, stride_ws, scale_rows, num_groups,
                     HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_QK_NORM: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr, ONE_STEP: tl.constexpr,
                     CHUNK: tl.constexpr,
                     CHUNKS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HV: tl.constexpr, BLOCK_HALF: tl.constexpr,
                     BLOCK_PASS: tl.constexpr, FP8: tl.constexpr, FP8_W: tl.constexpr, GROUP: tl.constexpr,
                     INTERPRET: tl.constexpr):
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    x_row = x_ptr + t.to(tl.int64) * stride_xt
    r_row = res_ptr + t.to(tl.int64) * stride_rt
    h_row = h_ptr + t.to(tl.int64) * hidden  # the normed row, or (FP8_W) its e4m3 quantization
    xs_row = xs_ptr + t.to(tl.int64) * num_groups
    _normed_row(x_row, r_row, nw_ptr, sum_ptr + t.to(tl.int64) * hidden, h_row, xs_row, hidden, eps,
                HAS_RES and pid_n == 0, HAS_RES, CHUNK, CHUNKS, FP8_W, GROUP, INTERPRET)
    group, per_token = _group(pid_n * BLOCK_N, num_q_heads, num_kv_heads, head_dim, v_head_dim, BLOCK_N)
    arrived = gemv_block_arrive(h_row, w_ptr, b_ptr, qkv_ptr + t.to(tl.int64) * rows, cnt_ptr + group, pid_n, rows,
                                hidden, stride_wn, xs_row, ws_ptr, stride_ws, scale_rows, HAS_BIAS, BLOCK_N, BLOCK_K,
                                K_TILES, ONE_STEP, FP8_W, GROUP, INTERPRET)
    if arrived == T * per_token - 1:  # the group's last program: its rows are all in qkv_TR
        tl.atomic_xchg(cnt_ptr + group, 0)
        q_rows = num_q_heads * head_dim
        k_ptr = qkv_ptr + q_rows
        v_ptr = k_ptr + num_kv_heads * head_dim
        for tt in range(0, T):
            rope_kv_head(qkv_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, qn_ptr, kn_ptr, qo_ptr, kc_ptr, vc_ptr, slot_ptr,
                         tl.full([], tt, tl.int32), group, rows, head_dim, rows, head_dim, rows, v_head_dim, stride_cs,
                         num_q_heads, num_kv_heads, head_dim, v_head_dim, half, qk_eps, k_scale, v_scale,
                         HAS_QK_NORM, BLOCK_H, BLOCK_HV, BLOCK_HALF, BLOCK_PASS, FP8, INTERPRET, True)


def group_counters(num_q_heads: int, num_kv_heads: int, device) -> torch.Tensor:
    """A layer's head-group counters, zeros: the kernel leaves them zero after every launch (its last programs
    reset them), so one tensor serves every step and every captured graph of the layer. A layer's launches are
    ordered on its stream; two launches of one layer in flight at once would need two tensors."""
    return torch.zeros(num_q_heads + num_kv_heads, dtype=torch.int32, device=device)


def _unfused(x_TD, residual_TD, norm_D, norm_eps, w_RD, bias_R, N, K, Hv, positions_T, cos_sin_PR, k_cache_BLKH,
             v_cache_BLKH, slot_mapping_T, q_norm_H, k_norm_H, eps, k_scale, v_scale, w_scale_inv, block):
    """The contract as three launches and the linear (a batch past MAX_TOKENS, heads no block divides, or an FP8
    scale block no program's rows fit in)."""
    from .triton_norm import triton_add_rms_norm, triton_rms_norm

    if residual_TD is None:
        h_TD, summed_TD = triton_rms_norm(x_TD, norm_D, norm_eps), x_TD
    else:
        h_TD, summed_TD = triton_add_rms_norm(x_TD, residual_TD, norm_D, norm_eps)
    T, H = x_TD.shape[0], k_cache_BLKH.shape[-1]
    if w_scale_inv is None:
        qkv_TR = torch.nn.functional.linear(h_TD, w_RD, bias_R)
    else:
        from .triton_fp8 import triton_fp8_linear

        qkv_TR = triton_fp8_linear(h_TD, w_RD, w_scale_inv, block, bias_R)
    q_TNH = triton_rope_write_kv(qkv_TR[:, :N * H].view(T, N, H), qkv_TR[:, N * H:(N + K) * H].view(T, K, H),
                                 qkv_TR[:, (N + K) * H:].view(T, K, Hv), positions_T, cos_sin_PR, k_cache_BLKH,
                                 v_cache_BLKH, slot_mapping_T, q_norm_H, k_norm_H, eps, k_scale, v_scale)
    return q_TNH, summed_TD


def _check(x_TD, residual_TD, norm_D, w_RD, bias_R, num_q_heads, num_kv_heads, head_dim, v_head_dim, w_scale_inv,
           block) -> tuple[int, int]:
    """The arguments' shapes and dtypes; returns the FP8 block (checked where w_scale_inv is given)."""
    common.check_dtype("x_TD", x_TD)
    T, D = x_TD.shape
    R = num_q_heads * head_dim + num_kv_heads * (head_dim + v_head_dim)
    if residual_TD is not None and (residual_TD.shape != x_TD.shape or residual_TD.dtype != x_TD.dtype):
        raise ValueError(f"residual_TD {tuple(residual_TD.shape)} {residual_TD.dtype} must match x_TD "
                         f"{tuple(x_TD.shape)} {x_TD.dtype}.")
    weights = (("norm_D", norm_D, (D,)), ("w_RD", w_RD, (R, D)), ("bias_R", bias_R, (R,)))
    if w_scale_inv is not None:
        block = check_fp8_gemv_weight("w_RD", w_RD, w_scale_inv, (R, D), block)
        weights = weights[::2]
    for name, t, shape in weights:
        if t is not None and (tuple(t.shape) != shape or t.dtype != x_TD.dtype):
            raise ValueError(f"{name} {tuple(t.shape)} {t.dtype} is invalid: must be {list(shape)} {x_TD.dtype} "
                             f"(N={num_q_heads}, K={num_kv_heads}, H={head_dim}, Hv={v_head_dim}).")
    if w_RD.stride(-1) != 1:
        raise ValueError("w_RD must have a unit last stride (a Linear's weight).")
    return block


def triton_norm_qkv_rope_kv(
    x_TD: torch.Tensor, residual_TD: torch.Tensor | None, norm_D: torch.Tensor, norm_eps: float, w_RD: torch.Tensor,
    bias_R: torch.Tensor | None, num_q_heads: int, num_kv_heads: int, v_head_dim: int, positions_T: torch.Tensor,
    cos_sin_PR: torch.Tensor, k_cache_BLKH: torch.Tensor, v_cache_BLKH: torch.Tensor, slot_mapping_T: torch.Tensor,
    q_norm_H: torch.Tensor | None = None, k_norm_H: torch.Tensor | None = None, eps: float = 1e-6,
    k_scale: float = 1.0, v_scale: float = 1.0, *, counters_G: torch.Tensor | None = None,
    w_scale_inv: torch.Tensor | None = None, block: tuple[int, int] = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `reference_norm_qkv_rope_kv`: one launch where `fused` (a decode batch), else the norm,
    the linear and rope_write_kv apart. counters_G: the layer's
    `group_counters` (zeros; the launch leaves them zero), made here when not given. w_scale_inv: w_RD is an FP8
    weight (e4m3, these block scales in `block`), W8A8 as triton_fp8_linear."""
    H = k_cache_BLKH.shape[-1]
    N, K = num_q_heads, num_kv_heads
    block = _check(x_TD, residual_TD, norm_D, w_RD, bias_R, N, K, H, v_head_dim, w_scale_inv, block)
    Rr = check_rope_kv(H, v_head_dim, K, x_TD.dtype, cos_sin_PR, k_cache_BLKH, v_cache_BLKH, q_norm_H, k_norm_H)
    T, D = x_TD.shape
    R = w_RD.shape[0]
    widest = block_rows(H, v_head_dim)
    fp8 = w_scale_inv is not None
    if fp8 and widest is not None:
        widest = fp8_gemv_rows(widest, block)
    if T > 0 and (not fused(T, H, v_head_dim) or widest is None or widest < 8):
        return _unfused(x_TD, residual_TD, norm_D, norm_eps, w_RD, bias_R, N, K, v_head_dim, positions_T, cos_sin_PR,
                        k_cache_BLKH, v_cache_BLKH, slot_mapping_T, q_norm_H, k_norm_H, eps, k_scale, v_scale,
                        w_scale_inv, block)
    summed_TD = common.workspace((T, D), x_TD.dtype, x_TD.device) if residual_TD is not None else x_TD
    q_TNH = common.workspace((T, N, H), x_TD.dtype, x_TD.device)
    if T == 0:
        return q_TNH, summed_TD
    counters_G = counters_G if counters_G is not None else group_counters(N, K, x_TD.device)
    if tuple(counters_G.shape) != (N + K,) or counters_G.dtype != torch.int32:
        raise ValueError(f"counters_G {tuple(counters_G.shape)} {counters_G.dtype} is invalid: must be [{N + K}] "
                         "int32 zeros (group_counters).")
    x_TD, cos_sin_PR = (t if t.stride(-1) == 1 else t.contiguous() for t in (x_TD, cos_sin_PR))
    residual_TD = residual_TD if residual_TD is None or residual_TD.stride(-1) == 1 else residual_TD.contiguous()
    interp = common.interpreting(x_TD)
    group = block[1] if fp8 else None
    bn, bk, tiles, one_step, warps = launch_shape(R, D, widest, interp, x_TD.device, itemsize=w_RD.element_size())
    qkv_TR = common.workspace((T, R), x_TD.dtype, x_TD.device)
    # The normed input, or (FP8) its e4m3 quantization and group scales: every program writes them alike.
    h_TD = common.workspace((T, D), FP8_DTYPE if fp8 else x_TD.dtype, x_TD.device)
    groups = triton.cdiv(D, block[1]) if fp8 else 0
    xs_TG = common.workspace((T, groups), torch.float32, x_TD.device) if fp8 else x_TD
    chunk = min(triton.next_power_of_2(D), 64 if interp else 512)  # the mean square's loads: 4 values a thread
    chunk = max(chunk, group or 1)  # FP8: whole groups a chunk (a power of two: a multiple of Bk)
    ws = w_scale_inv if w_scale_inv is None or w_scale_inv.stride(-1) == 1 else w_scale_inv.contiguous()
    has_norm = q_norm_H is not None
    _norm_qkv_kernel[(T, R // bn)](
        x_TD, residual_TD if residual_TD is not None else x_TD, norm_D, w_RD, bias_R if bias_R is not None else norm_D,
        qkv_TR, summed_TD, h_TD, counters_G, positions_T, cos_sin_PR, q_norm_H if has_norm else norm_D,
        k_norm_H if has_norm else norm_D, q_TNH, k_cache_BLKH, v_cache_BLKH, slot_mapping_T,
        T, D, R, x_TD.stride(0), residual_TD.stride(0) if residual_TD is not None else 0, w_RD.stride(0),
        cos_sin_PR.stride(0), N, K, H, v_head_dim, Rr // 2, float(norm_eps), float(eps), float(k_scale),
        float(v_scale), xs_TG, ws if ws is not None else x_TD, ws.stride(0) if ws is not None else 0,
        block[0] if fp8 else 1, groups, HAS_RES=residual_TD is not None, HAS_BIAS=bias_R is not None, HAS_QK_NORM=has_norm,
        BLOCK_N=bn, BLOCK_K=bk, K_TILES=tiles, ONE_STEP=one_step, CHUNK=chunk, CHUNKS=triton.cdiv(D, chunk), BLOCK_H=triton.next_power_of_2(H),
        BLOCK_HV=triton.next_power_of_2(v_head_dim), BLOCK_HALF=triton.next_power_of_2(max(Rr // 2, 1)),
        BLOCK_PASS=triton.next_power_of_2(max(H - Rr, 1)), FP8=k_cache_BLKH.dtype in FP8_CACHE_DTYPES,
        FP8_W=fp8, GROUP=group or 1, INTERPRET=interp, num_warps=warps,
        enable_fp_fusion=False,  # no FMA in the epilogue's rotary: torch rounds x·cos before adding
    )
    return q_TNH, summed_TD
