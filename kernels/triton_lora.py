"""LoRA shrink and expand over a batch of mixed adapters (kernels/lora.py is the contract). One program per (row,
block of outputs): the row reads its slot once and skips all work for -1 (no adapter); the rank is small (<= 64 in
practice), so each program reduces over K (shrink) or R (expand) in fp32 with vector sums, no tensor cores.

Legend: T tokens, K in features, N out features, R rank (padded), L slots.

Why not a dot: a row's adapter differs from its neighbour's, so rows share no tile of A or B. A grouped layout
(rows sorted by slot, as vLLM's punica kernels sort them) would feed tensor cores; that is the next step on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .triton_common import cast


@triton.jit
def _lora_shrink_kernel(x_ptr, a_ptr, slots_ptr, t_ptr, K, R, stride_xt, stride_al, stride_ar,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok_r = offs_r < R
    slot = tl.load(slots_ptr + row).to(tl.int64)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if slot >= 0:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            ok_k = offs_k < K
            x = tl.load(x_ptr + row * stride_xt + offs_k, mask=ok_k, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + slot * stride_al + offs_r[:, None] * stride_ar + offs_k[None, :],
                        mask=ok_r[:, None] & ok_k[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(a * x[None, :], axis=1)
    tl.store(t_ptr + row * R + offs_r, cast(acc, t_ptr.dtype.element_ty, INTERPRET), mask=ok_r)


@triton.jit
def _lora_expand_kernel(y_ptr, t_ptr, b_ptr, slots_ptr, scale_ptr, N, R, stride_yt, stride_tt, stride_bl, stride_bn,
                   BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok_n = offs_n < N
    slot = tl.load(slots_ptr + row).to(tl.int64)
    if slot >= 0:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            ok_r = offs_r < R
            t = tl.load(t_ptr + row * stride_tt + offs_r, mask=ok_r, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + slot * stride_bl + offs_n[:, None] * stride_bn + offs_r[None, :],
                        mask=ok_n[:, None] & ok_r[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(b * t[None, :], axis=1)
        scale = tl.load(scale_ptr + slot).to(tl.float32)
        y_at = y_ptr + row * stride_yt + offs_n
        y = tl.load(y_at, mask=ok_n, other=0.0).to(tl.float32)
        tl.store(y_at, cast(y + scale * acc, y_ptr.dtype.element_ty, INTERPRET), mask=ok_n)


def _check(x: torch.Tensor, w: torch.Tensor, slots_T: torch.Tensor, what: str) -> None:
    common.check_dtype(what, x)
    if w.dim() != 3 or w.stride(-1) != 1 or slots_T.dim() != 1 or slots_T.shape[0] != x.shape[0]:
        raise ValueError(f"{what}: weights {tuple(w.shape)} must be [L, rows, cols] with unit last stride and slots "
                         f"{tuple(slots_T.shape)} one per row of {tuple(x.shape)}.")


def triton_lora_shrink(x_TK: torch.Tensor, a_LRK: torch.Tensor, slots_T: torch.Tensor) -> torch.Tensor:
    """Same contract as `reference_lora_shrink`."""
    _check(x_TK, a_LRK, slots_T, "x_TK")
    x_TK = x_TK if x_TK.stride(-1) == 1 else x_TK.contiguous()
    T, K = x_TK.shape
    R = a_LRK.shape[1]
    t_TR = torch.empty(T, R, dtype=x_TK.dtype, device=x_TK.device)
    if T == 0:
        return t_TR
    BLOCK_R = min(64, triton.next_power_of_2(R))
    BLOCK_K = min(128, triton.next_power_of_2(K))
    _lora_shrink_kernel[(T, triton.cdiv(R, BLOCK_R))](
        x_TK, a_LRK, slots_T, t_TR, K, R, x_TK.stride(0), a_LRK.stride(0), a_LRK.stride(1),
        BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, INTERPRET=common.interpreting(x_TK), num_warps=4)
    return t_TR


def triton_lora_expand(y_TN: torch.Tensor, t_TR: torch.Tensor, b_LNR: torch.Tensor, slots_T: torch.Tensor,
                       scale_L: torch.Tensor) -> torch.Tensor:
    """Same contract as `reference_lora_expand`: in place; y may be a column view (unit last stride)."""
    _check(y_TN, b_LNR, slots_T, "y_TN")
    if y_TN.stride(-1) != 1 or t_TR.stride(-1) != 1:
        raise ValueError("y_TN and t_TR must have a unit last stride (a column view of a projection is fine).")
    T, N = y_TN.shape
    R = b_LNR.shape[2]
    if T == 0:
        return y_TN
    BLOCK_N = min(128, triton.next_power_of_2(N))
    BLOCK_R = min(64, triton.next_power_of_2(R))
    _lora_expand_kernel[(T, triton.cdiv(N, BLOCK_N))](
        y_TN, t_TR, b_LNR, slots_T, scale_L, N, R, y_TN.stride(0), t_TR.stride(0), b_LNR.stride(0), b_LNR.stride(1),
        BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, INTERPRET=common.interpreting(y_TN), num_warps=4)
    return y_TN
