"""A decode batch's dense MLP (the dense layers', the shared experts') in two launches: gate-up with SiLU·up
(`reference_gate_up_silu_mul`: the linear, then silu_mul on its two pieces) and down with an optional addend
(`reference_linear_add`: the linear, then the add: the shared experts' output summed with the routed experts').
The references are those compositions, the contract and the oracle; kernels/triton_mlp_gemv.py does each in one
launch for up to FUSED_MAX_TOKENS tokens (kernels/norm.py), the weights float or FP8 block-scaled (W8A8).

Legend: T tokens, K in features, I intermediate size, F rows of the stacked gate-up weight (gate rows [0, I), up
rows [U, U + I): U = I for a float stack, the first multiple of the FP8 block's Bn at or after I for an FP8
one), N out features.

Why: at batch 1 DeepSeek's shared experts were four dependent launches a MoE layer (the GEMM, SiLU·up, the GEMM,
the add; six with FP8's two activation quantizations), each a ramp and a tail around a few MB of weight bytes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp8 import DEFAULT_BLOCK, reference_fp8_linear
from .silu_mul import reference_silu_mul


def _linear(x_TK, w_NK, w_scale_inv, block):
    return F.linear(x_TK, w_NK) if w_scale_inv is None else reference_fp8_linear(x_TK, w_NK, w_scale_inv, block)


def reference_gate_up_silu_mul(x_TK: torch.Tensor, w_FK: torch.Tensor, inter: int, up_row: int, *,
                               w_scale_inv: torch.Tensor | None = None,
                               block: tuple[int, int] = DEFAULT_BLOCK) -> torch.Tensor:
    """SiLU(gate) · up, [T, I] in x's dtype: y = x w_FKᵀ (W8A8 where w_scale_inv: w_FK e4m3 in `block` scale
    blocks), gate = y[:, :I], up = y[:, U:U + I], then silu_mul's two roundings."""
    if not 0 < inter <= up_row or up_row + inter > w_FK.shape[0]:
        raise ValueError(f"inter={inter}, up_row={up_row} do not fit a gate-up weight of {w_FK.shape[0]} rows: gate "
                         "rows [0, inter), up rows [up_row, up_row + inter), up_row >= inter.")
    y_TF = _linear(x_TK, w_FK, w_scale_inv, block)
    return reference_silu_mul(y_TF[:, :inter], y_TF[:, up_row:up_row + inter])


def reference_linear_add(x_TK: torch.Tensor, w_NK: torch.Tensor, addend_TN: torch.Tensor | None = None, *,
                         w_scale_inv: torch.Tensor | None = None,
                         block: tuple[int, int] = DEFAULT_BLOCK) -> torch.Tensor:
    """x w_NKᵀ (W8A8 where w_scale_inv), rounded to x's dtype, plus addend (rounded once more: torch's add), [T, N]."""
    y_TN = _linear(x_TK, w_NK, w_scale_inv, block)
    return y_TN if addend_TN is None else y_TN + addend_TN
