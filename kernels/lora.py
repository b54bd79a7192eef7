"""LoRA's two matmuls over a batch where every row may carry a different adapter (or none): shrink, t = x A^T with
row t's adapter's A, then expand, y += scale · t B^T with its B (engine/lora/ holds the adapters in device slots).
Reference: plain torch, the CPU path and the oracle of kernels/triton_lora.py: each row's A / B gathered by its
slot, one batched matmul.

Legend: T tokens, K in features, N out features, R the slots' rank (the largest adapter rank: smaller adapters
zero-padded), L adapter slots.

A row's slot is its request's adapter slot, -1 for none: shrink gives zeros there and expand adds nothing, so a
mixed batch runs one launch each whatever it mixes. "Nothing" exactly: a row of no adapter gathers slot 0's A / B (a
gather needs an index), and slot 0's values never reach it: its product is dropped by a select, never multiplied by
a zero scale (0 · inf is NaN: one inf in another request's adapter made every base-model row NaN).
"""
from __future__ import annotations

import torch


def reference_lora_shrink(x_TK: torch.Tensor, a_LRK: torch.Tensor, slots_T: torch.Tensor) -> torch.Tensor:
    """t[i] = x[i] A[slots[i]]^T, zeros where slots[i] < 0: [T, R] of x's dtype."""
    a_TRK = a_LRK[slots_T.clamp_min(0)]
    t_TR = torch.bmm(a_TRK, x_TK.unsqueeze(-1)).squeeze(-1)
    return torch.where((slots_T >= 0).unsqueeze(-1), t_TR, torch.zeros_like(t_TR))


def reference_lora_expand(y_TN: torch.Tensor, t_TR: torch.Tensor, b_LNR: torch.Tensor, slots_T: torch.Tensor,
                          scale_L: torch.Tensor) -> torch.Tensor:
    """y[i] += scale[slots[i]] · t[i] B[slots[i]]^T where slots[i] >= 0, in place (y may be a column view of a
    stacked projection's output); returns y."""
    slot_T = slots_T.clamp_min(0)
    d_TN = torch.bmm(b_LNR[slot_T], t_TR.unsqueeze(-1)).squeeze(-1)
    d_TN = d_TN * scale_L[slot_T].unsqueeze(-1).to(d_TN.dtype)
    # Selected, not scaled by 0: a row of no adapter read slot 0's B, whose inf or NaN times 0 would be NaN.
    y_TN += torch.where((slots_T >= 0).unsqueeze(-1), d_TN, torch.zeros_like(d_TN)).to(y_TN.dtype)
    return y_TN
