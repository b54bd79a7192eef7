"""Routed experts with per-expert LoRA in Triton: the deltas run on the grouped GEMM's own sorted layout, inside
the sorted fused MoE (kernels/triton_moe.py `sorted_fused_moe`), so a step with expert adapters is the float
pipeline's launches plus four, with no host loop and no device→host sync (decode CUDA graphs capture it).
kernels/lora_moe.py is the contract (its plain-torch references).

Legend: T tokens, K top-k, P = T*K pairs, E local experts, D hidden, I intermediate, F = 2I, R the slots' rank,
X = L * E stack rows (slot s, expert e at s E + e), S sorted rows (kernels/moe_align.py: each row a pair or the
padding sentinel P, each BLOCK_M block one expert or -1).

The pipeline, after the alignment (the same sorted rows and block → expert map the GEMMs read):
1. gate_up shrink: t13[r] = x[tok(r)] A13[slot(tok) E + e(r)]^T, one program per sorted row (and rank block);
2. gate_up expand: d[r] = scale · t13[r] B13[...]^T, [S, F] in sorted rows (zeros for rows of no adapter);
3. the gate-up GEMM adds d's row to its gate and up accumulators before the activation (its ROW_BIAS epilogue,
   kernels/triton_moe_gemm.py), so the delta sits where peft puts it: inside the expert, before act();
4. the down GEMM writes each pair's routed-weighted row (combine "sum"); down shrink reads the activation h's
   sorted rows, down expand adds w[pair] · scale · t2 B2^T into the pair's row; the top-k sum as always.
Rows of one block may carry different slots (or none): each program reads its row's slot and skips all work for
-1, a padding row or a dead block. The reductions are fp32 vector sums (no dot): rows of one block share their
expert but not their adapter, so they share no tile of A or B. The rank is small (<= 64 in practice).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .lora_moe import ExpertLoRA
from .moe import SILU, MoEActivation
from .moe_config import MoELaunchConfig, get_moe_config
from .triton_common import cast
from .triton_moe import _check, routed
from .triton_moe_float import FloatFormat


@triton.jit
def _live_row(pair, row, expert_ids_ptr, slots_ptr, top_k, num_experts, BLOCK_M: tl.constexpr):
    """(token, stack row or -1, expert or -1) of a sorted row whose entry is a pair (not the padding sentinel):
    stack -1 for a dead block (an expert of another rank) or a token with no adapter; expert -1 for a dead block."""
    expert = tl.load(expert_ids_ptr + row // BLOCK_M).to(tl.int64)
    tok = pair // top_k
    slot = tl.load(slots_ptr + tok).to(tl.int64)
    stack = tl.where((expert >= 0) & (slot >= 0), slot * num_experts + expert, -1)
    return tok, stack, expert


# Both kernels read the row's sorted entry first and stop there for the padding sentinel: most rows of a small batch
# are padding (up to BLOCK_M - 1 an expert), so their programs do one load, a compare and (gate_up, shrink) a store of
# zeros, not the whole row lookup.
@triton.jit(do_not_specialize=["num_pairs"])
def _sorted_lora_shrink_kernel(x_ptr, a_ptr, slots_ptr, sorted_ptr, expert_ids_ptr, t_ptr, num_pairs, top_k,
                               num_experts, K, R, stride_xr, stride_ax, stride_ar, stride_tr, BLOCK_M: tl.constexpr,
                               GATHER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                               INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok_r = offs_r < R
    pair = tl.load(sorted_ptr + row).to(tl.int64)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if pair < num_pairs:
        tok, stack, _ = _live_row(pair, row, expert_ids_ptr, slots_ptr, top_k, num_experts, BLOCK_M)
        if stack >= 0:
            src = tok if GATHER else row  # gate_up reads x's token row; down the activation's sorted row
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                ok_k = offs_k < K
                x = tl.load(x_ptr + src * stride_xr + offs_k, mask=ok_k, other=0.0).to(tl.float32)
                a = tl.load(a_ptr + stack * stride_ax + offs_r[:, None] * stride_ar + offs_k[None, :],
                            mask=ok_r[:, None] & ok_k[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(a * x[None, :], axis=1)
    tl.store(t_ptr + row * stride_tr + offs_r, cast(acc, t_ptr.dtype.element_ty, INTERPRET), mask=ok_r)


@triton.jit(do_not_specialize=["num_pairs"])
def _sorted_lora_expand_kernel(y_ptr, t_ptr, b_ptr, scale_ptr, slots_ptr, sorted_ptr, expert_ids_ptr, weights_ptr,
                               bias_ptr, num_pairs, top_k, num_experts, N, R, stride_yr, stride_tr, stride_bx,
                               stride_bn, stride_be, BLOCK_M: tl.constexpr, ROUTED: tl.constexpr,
                               HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                               INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok_n = offs_n < N
    pair = tl.load(sorted_ptr + row).to(tl.int64)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if pair < num_pairs:
        _, stack, expert = _live_row(pair, row, expert_ids_ptr, slots_ptr, top_k, num_experts, BLOCK_M)
        if stack >= 0:
            for r0 in range(0, R, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                ok_r = offs_r < R
                t = tl.load(t_ptr + row * stride_tr + offs_r, mask=ok_r, other=0.0).to(tl.float32)
                b = tl.load(b_ptr + stack * stride_bx + offs_n[:, None] * stride_bn + offs_r[None, :],
                            mask=ok_n[:, None] & ok_r[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(b * t[None, :], axis=1)
            acc = acc * tl.load(scale_ptr + stack).to(tl.float32)
            if ROUTED:  # down: the pair's row of the routed-weighted outputs, w[pair] · delta added
                y_at = y_ptr + pair * stride_yr + offs_n
                w = tl.load(weights_ptr + pair).to(tl.float32)
                y = tl.load(y_at, mask=ok_n, other=0.0).to(tl.float32)
                tl.store(y_at, cast(y + w * acc, y_ptr.dtype.element_ty, INTERPRET), mask=ok_n)
        if HAS_BIAS:  # gate_up with the expert's bias: the GEMM's bias slot carries this row's sum
            if expert >= 0:
                acc += tl.load(bias_ptr + expert * stride_be + offs_n, mask=ok_n, other=0.0).to(tl.float32)
    if not ROUTED:  # gate_up: the sorted row's pre-activation delta, zeros where none (every row written: no memset)
        tl.store(y_ptr + row * stride_yr + offs_n, cast(acc, y_ptr.dtype.element_ty, INTERPRET), mask=ok_n)


def _check_lora(name: str, lora: ExpertLoRA, rows: int, k_in: int, n_out: int) -> None:
    a, b, s = lora
    R = a.shape[1] if a.dim() == 3 else -1
    if (a.dim() != 3 or b.dim() != 3 or a.shape[0] != rows or a.shape[2] != k_in or tuple(b.shape) != (rows, n_out, R)
            or s.shape != (rows,) or a.stride(-1) != 1 or b.stride(-1) != 1):
        raise ValueError(f"{name}: A {tuple(a.shape)}, B {tuple(b.shape)}, scale {tuple(s.shape)} must be "
                         f"[X, R, {k_in}], [X, {n_out}, R] and [X] with X a multiple of the experts (here {rows}), "
                         "unit last strides.")


def triton_sorted_lora_shrink(x_MK: torch.Tensor, a_XRK: torch.Tensor, slots_T: torch.Tensor, sorted_S: torch.Tensor,
                              expert_ids_B: torch.Tensor, num_pairs: int, top_k: int, num_experts: int, gather: bool,
                              t_SR: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `reference_sorted_lora_shrink`: [S, R] in x's dtype (into `t_SR` if given)."""
    common.check_dtype("x_MK", x_MK)
    S, R, K = sorted_S.numel(), a_XRK.shape[1], x_MK.shape[1]
    t_SR = common.workspace((S, R), x_MK.dtype, x_MK.device) if t_SR is None else t_SR
    if S == 0:
        return t_SR
    BLOCK_R = min(64, triton.next_power_of_2(R))
    BLOCK_K = min(128, triton.next_power_of_2(K))
    _sorted_lora_shrink_kernel[(S, triton.cdiv(R, BLOCK_R))](
        x_MK, a_XRK, slots_T, sorted_S, expert_ids_B, t_SR, num_pairs, top_k, num_experts, K, R, x_MK.stride(0),
        a_XRK.stride(0), a_XRK.stride(1), t_SR.stride(0), BLOCK_M=S // expert_ids_B.numel(), GATHER=gather,
        BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, INTERPRET=common.interpreting(x_MK), num_warps=4)
    return t_SR


def triton_sorted_lora_expand(y_MN: torch.Tensor, t_SR: torch.Tensor, b_XNR: torch.Tensor, scale_X: torch.Tensor,
                              slots_T: torch.Tensor, sorted_S: torch.Tensor, expert_ids_B: torch.Tensor,
                              weights_P: torch.Tensor | None, top_k: int, num_experts: int,
                              bias_EN: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `reference_sorted_lora_expand` (y's rows contiguous): in place; returns y. `bias_EN` (only
    with `weights_P` None): each live row's expert bias added to its delta (gate_up's b13 rides the same slot)."""
    if y_MN.stride(-1) != 1 or t_SR.stride(-1) != 1:
        raise ValueError("y_MN and t_SR must have a unit last stride.")
    S, (N, R) = sorted_S.numel(), b_XNR.shape[1:]
    if S == 0:
        return y_MN
    num_pairs = weights_P.numel() if weights_P is not None else slots_T.numel() * top_k
    BLOCK_N = min(128, triton.next_power_of_2(N))
    BLOCK_R = min(64, triton.next_power_of_2(R))
    _sorted_lora_expand_kernel[(S, triton.cdiv(N, BLOCK_N))](
        y_MN, t_SR, b_XNR, scale_X, slots_T, sorted_S, expert_ids_B, slots_T if weights_P is None else weights_P,
        scale_X if bias_EN is None else bias_EN, num_pairs, top_k, num_experts, N, R, y_MN.stride(0), t_SR.stride(0),
        b_XNR.stride(0), b_XNR.stride(1), 0 if bias_EN is None else bias_EN.stride(0),
        BLOCK_M=S // expert_ids_B.numel(), ROUTED=weights_P is not None, HAS_BIAS=bias_EN is not None,
        BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, INTERPRET=common.interpreting(y_MN), num_warps=4)
    return y_MN


@dataclass(frozen=True)
class SortedLoRA:
    """The LoRA deltas `sorted_fused_moe` runs on its sorted rows (the `lora` hook): each token's slot, the two
    expert tensors' adapters (None: no delta on it)."""

    slots_T: torch.Tensor
    gate_up: ExpertLoRA | None
    down: ExpertLoRA | None
    num_experts: int
    top_k: int
    b13_EF: torch.Tensor | None = None  # the experts' gate-up bias, added with the delta (the GEMM's bias slot)

    def gate_up_rows(self, x_TD: torch.Tensor, sorted_S: torch.Tensor, expert_ids_B: torch.Tensor,
                     inter: int) -> torch.Tensor | None:
        """The pre-activation delta of each sorted row [S, F] (fp32: it is added to the GEMM's fp32 accumulators),
        or None without a gate_up adapter."""
        if self.gate_up is None:
            return None
        S, P = sorted_S.numel(), x_TD.shape[0] * self.top_k
        t_SR = triton_sorted_lora_shrink(x_TD, self.gate_up.a_XRK, self.slots_T, sorted_S, expert_ids_B, P, self.top_k,
                                         self.num_experts, gather=True)
        d_SF = common.workspace((S, 2 * inter), torch.float32, x_TD.device)
        return triton_sorted_lora_expand(d_SF, t_SR, self.gate_up.b_XNR, self.gate_up.scale_X, self.slots_T, sorted_S,
                                         expert_ids_B, None, self.top_k, self.num_experts, self.b13_EF)

    def add_down(self, h_SI: torch.Tensor, y_PD: torch.Tensor, weights_P: torch.Tensor, sorted_S: torch.Tensor,
                 expert_ids_B: torch.Tensor) -> None:
        """y[pair] += w[pair] · down's delta of the pair's activation row, for each sorted row with an adapter."""
        if self.down is None:
            return
        t_SR = triton_sorted_lora_shrink(h_SI, self.down.a_XRK, self.slots_T, sorted_S, expert_ids_B, weights_P.numel(),
                                         self.top_k, self.num_experts, gather=False)
        triton_sorted_lora_expand(y_PD, t_SR, self.down.b_XNR, self.down.scale_X, self.slots_T, sorted_S, expert_ids_B,
                                  weights_P, self.top_k, self.num_experts)


def triton_lora_fused_moe(x_TD: torch.Tensor, w13_EFD: torch.Tensor, w2_EDI: torch.Tensor,
                          topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor, slots_T: torch.Tensor,
                          gate_up: ExpertLoRA | None, down: ExpertLoRA | None, *, b13_EF: torch.Tensor | None = None,
                          b2_ED: torch.Tensor | None = None, activation: MoEActivation = SILU,
                          config: MoELaunchConfig | None = None) -> torch.Tensor:
    """Same contract as `reference_lora_fused_moe`: the sorted fused MoE (always the sorted path: the tiny one has
    no sorted rows) with the deltas on its sorted rows; [T, D] in x's dtype. No device→host sync."""
    _check(x_TD, w13_EFD, w2_EDI, topk_weights_TK, topk_ids_TK)
    E, F, D = w13_EFD.shape
    I = F // 2
    for name, lora, k_in, n_out in (("gate_up", gate_up, D, F), ("down", down, I, D)):
        if lora is not None:
            _check_lora(name, lora, lora.a_XRK.shape[0], k_in, n_out)
            if lora.a_XRK.shape[0] % E:
                raise ValueError(f"{name}: {lora.a_XRK.shape[0]} stack rows are not slots x {E} experts.")
    if slots_T.shape != (x_TD.shape[0],):
        raise ValueError(f"slots_T {tuple(slots_T.shape)} must be one slot per token of x_TD {tuple(x_TD.shape)}.")
    r = routed(x_TD, topk_weights_TK, topk_ids_TK, E, I, b13_EF, b2_ED, activation, None, "sum")
    if r.T == 0:
        return r.out
    w13_EFD, w2_EDI = (t if t.stride(-1) == 1 else t.contiguous() for t in (w13_EFD, w2_EDI))
    cfg = config or get_moe_config(E, I, r.T, r.K, r.x_TD.device)
    lora = SortedLoRA(slots_T, gate_up, down, E, r.K, r.b13_EF)
    if gate_up is not None:  # b13 rides in gate_up's per-row delta (the GEMM's one bias slot)
        r = r._replace(b13_EF=None)
    return r.sorted(FloatFormat(E, I, w13_EFD, w2_EDI), None, cfg, "sum", lora=lora)
