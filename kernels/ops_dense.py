"""The dense family of the kernel seam (kernels/ops.py): the dense MLPs' and shared experts' SiLU(gate)·up, the FP8
block-scaled W8A8 linear, and a decode batch's dense MLP as two GEMVs with their epilogues (kernels/mlp_gemv.py).

References in kernels/silu_mul.py, kernels/fp8.py (the contract); Triton in kernels/triton_silu_mul.py,
triton_fp8.py (imported only when a Triton backend is built). Legend: T tokens, I intermediate size, K in features,
N out features.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from . import registry
from .fp8 import reference_fp8_linear
from .mlp_gemv import reference_gate_up_silu_mul, reference_linear_add
from .silu_mul import reference_silu_mul


class DenseKernels(Protocol):
    def silu_mul(self, gate_TI: torch.Tensor, up_TI: torch.Tensor) -> torch.Tensor:
        """F.silu(gate) * up: [T, I] of the inputs' dtype (strided views are fine)."""
        ...

    def fp8_linear(self, x_TK: torch.Tensor, wq_NK: torch.Tensor, w_scale_inv: torch.Tensor,
                   block: tuple[int, int] = (128, 128), bias_N: torch.Tensor | None = None) -> torch.Tensor:
        """W8A8 block-scaled linear: x quantized per token per Bk channels, w dequantized per block: [T, N]."""
        ...


    def gate_up_silu_mul(self, x_TK: torch.Tensor, w_FK: torch.Tensor, inter: int, up_row: int, *,
                         w_scale_inv: torch.Tensor | None = None,
                         block: tuple[int, int] = (128, 128)) -> torch.Tensor:
        """SiLU(gate) · up of a stacked gate-up linear (gate rows [0, I), up rows [up_row, up_row + I); W8A8 where
        w_scale_inv): [T, I]; one launch for a decode batch on a GPU (kernels/mlp_gemv.py)."""
        ...

    def linear_add(self, x_TK: torch.Tensor, w_NK: torch.Tensor, addend_TN: torch.Tensor | None = None, *,
                   w_scale_inv: torch.Tensor | None = None, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
        """x w_NKᵀ (W8A8 where w_scale_inv) + addend: [T, N]; one launch for a decode batch on a GPU (the shared
        experts' down projection with the routed experts' sum)."""
        ...


def _triton() -> dict[str, Any]:
    from .triton_fp8 import triton_fp8_linear
    from .triton_mlp_gemv import triton_gate_up_silu_mul, triton_linear_add
    from .triton_silu_mul import triton_silu_mul

    return dict(silu_mul=triton_silu_mul,  # one launch
                fp8_linear=triton_fp8_linear,
                gate_up_silu_mul=triton_gate_up_silu_mul,  # the GEMV and SiLU·up: one launch (a decode batch's)
                linear_add=triton_linear_add)  # the GEMV and the add: one launch (a decode batch's)


registry.register("dense", DenseKernels, triton=_triton,
                  reference=dict(silu_mul=reference_silu_mul, fp8_linear=reference_fp8_linear,
                                 gate_up_silu_mul=reference_gate_up_silu_mul, linear_add=reference_linear_add))
