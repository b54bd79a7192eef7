"""Routed experts with per-expert LoRA adapters, the plain-torch references (the CPU path and the oracle of
kernels/triton_lora_moe.py).

`reference_lora_fused_moe`: kernels/moe.py's reference loop over the local experts with the adapters' deltas inside:
for expert e's (token, e) pairs, gate_up = x W13_e^T + LoRA(gate_up), the activation, y = a W2_e^T + LoRA(down),
each pair's adapter its token's. An expert tensor's stacks hold slot s, expert e at row s E + e, so the deltas are
the LoRA family's shrink / expand over rows of mixed adapters (kernels/lora.py).
`reference_sorted_lora_shrink` / `reference_sorted_lora_expand`: the same deltas over the grouped GEMM's sorted
layout (kernels/moe_align.py: each sorted row a pair, each BLOCK_M block one expert), what the Triton kernels do.

Legend: T tokens, K top-k, P = T*K pairs, E local experts, D hidden, I expert intermediate, F = 2I, R the slots'
rank, X = L * E stack rows (L slots), S sorted rows (a multiple of BLOCK_M), n an expert's pairs.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .lora import reference_lora_expand, reference_lora_shrink
from .moe import SILU, MoEActivation, per_expert, sort_pairs


class ExpertLoRA(NamedTuple):
    """One expert tensor's adapters (gate_up_proj or down_proj) in the slots: A [X, R, K_in], B [X, N_out, R],
    scale [X]; row s E + e is slot s's expert e."""

    a_XRK: torch.Tensor
    b_XNR: torch.Tensor
    scale_X: torch.Tensor


def reference_lora_fused_moe(x_TD: torch.Tensor, w13_EFD: torch.Tensor, w2_EDI: torch.Tensor,
                             topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor, slots_T: torch.Tensor,
                             gate_up: ExpertLoRA | None, down: ExpertLoRA | None, *,
                             b13_EF: torch.Tensor | None = None, b2_ED: torch.Tensor | None = None,
                             activation: MoEActivation = SILU) -> torch.Tensor:
    """out[t] = Σ_k w[t,k] · expert_{ids[t,k]}(x[t]) with each expert's gate_up_proj and down_proj carrying the
    adapter of slots[t] (none where -1; a tensor None: no delta); [T, D] in x's dtype. Ids -1 (padding) contribute
    nothing. Host syncs: the counts drive the loop."""
    num_experts, top_k = w13_EFD.shape[0], topk_ids_TK.shape[1]
    out_TD = torch.zeros_like(x_TD)
    _, order_P, counts_E = sort_pairs(topk_ids_TK, num_experts)
    weights_P = topk_weights_TK.reshape(-1)
    for e, pairs_n, tok_n in per_expert(order_P, counts_E.tolist(), top_k):
        x_nD = x_TD.index_select(0, tok_n)
        slot_n = slots_T.index_select(0, tok_n)
        row_n = torch.where(slot_n >= 0, slot_n * num_experts + e, torch.full_like(slot_n, -1))  # its stack row
        h_nF = F.linear(x_nD, w13_EFD[e], None if b13_EF is None else b13_EF[e])
        if gate_up is not None:
            t_nR = reference_lora_shrink(x_nD, gate_up.a_XRK, row_n)
            reference_lora_expand(h_nF, t_nR, gate_up.b_XNR, row_n, gate_up.scale_X)
        gate_nI, up_nI = h_nF.chunk(2, dim=-1)
        a_nI = activation(gate_nI, up_nI)
        y_nD = F.linear(a_nI, w2_EDI[e], None if b2_ED is None else b2_ED[e])
        if down is not None:
            t_nR = reference_lora_shrink(a_nI, down.a_XRK, row_n)
            reference_lora_expand(y_nD, t_nR, down.b_XNR, row_n, down.scale_X)
        y_nD = y_nD * weights_P.index_select(0, pairs_n)[:, None].to(y_nD.dtype)
        out_TD.index_add_(0, tok_n, y_nD.to(out_TD.dtype))
    return out_TD


def sorted_stack_rows(sorted_S: torch.Tensor, expert_ids_B: torch.Tensor, slots_T: torch.Tensor, num_pairs: int,
                      top_k: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Of each sorted row: (pair, token, stack row s E + e or -1: a padding row, a dead block, a token of no
    adapter), all long [S]."""
    S = sorted_S.numel()
    pair_S = sorted_S.long()
    expert_S = expert_ids_B.long().repeat_interleave(S // expert_ids_B.numel())
    live_S = (pair_S < num_pairs) & (expert_S >= 0)
    tok_S = torch.where(live_S, pair_S, torch.zeros_like(pair_S)) // top_k
    slot_S = torch.where(live_S, slots_T.long()[tok_S], torch.full_like(pair_S, -1))
    stack_S = torch.where(slot_S >= 0, slot_S * num_experts + expert_S, torch.full_like(pair_S, -1))
    return pair_S, tok_S, stack_S


def reference_sorted_lora_shrink(x_MK: torch.Tensor, a_XRK: torch.Tensor, slots_T: torch.Tensor,
                                 sorted_S: torch.Tensor, expert_ids_B: torch.Tensor, num_pairs: int, top_k: int,
                                 num_experts: int, gather: bool) -> torch.Tensor:
    """t[r] = x_r A[slot(r) E + e(r)]^T for each sorted row r (zeros where it has no adapter): [S, R]. x_r is x's
    row of the pair's token (`gather`: gate_up reads x [T, D]) or x's row r (down reads the activation [S, I])."""
    _, tok_S, stack_S = sorted_stack_rows(sorted_S, expert_ids_B, slots_T, num_pairs, top_k, num_experts)
    return reference_lora_shrink(x_MK[tok_S] if gather else x_MK, a_XRK, stack_S)


def reference_sorted_lora_expand(y_MN: torch.Tensor, t_SR: torch.Tensor, b_XNR: torch.Tensor, scale_X: torch.Tensor,
                                 slots_T: torch.Tensor, sorted_S: torch.Tensor, expert_ids_B: torch.Tensor,
                                 weights_P: torch.Tensor | None, top_k: int, num_experts: int) -> torch.Tensor:
    """The delta scale · t[r] B[slot(r) E + e(r)]^T of each sorted row r. `weights_P` None: y [S, N] is set to it
    (zeros where none; gate_up's pre-activation delta); else y [P, N] of pairs, y[pair(r)] += w[pair(r)] · delta
    (down's, routed-weighted). In place; returns y."""
    num_pairs = weights_P.numel() if weights_P is not None else int(slots_T.numel() * top_k)
    pair_S, _, stack_S = sorted_stack_rows(sorted_S, expert_ids_B, slots_T, num_pairs, top_k, num_experts)
    d_SN = reference_lora_expand(torch.zeros(t_SR.shape[0], y_MN.shape[1], dtype=torch.float64), t_SR, b_XNR,
                                 stack_S, scale_X)
    if weights_P is None:
        y_MN.copy_(d_SN)
        return y_MN
    live = stack_S >= 0
    y_MN.index_add_(0, pair_S[live], (d_SN[live] * weights_P.double()[pair_S[live], None]).to(y_MN.dtype))
    return y_MN
