"""The dense family of the kernel seam (kernels/ops.py): the dense MLPs' and shared experts' SiLU(gate)·up, and the
FP8 block-scaled W8A8 linear.

References in kernels/silu_mul.py, kernels/fp8.py (the contract); Triton in kernels/triton_silu_mul.py,
triton_fp8.py (imported only when a Triton backend is built). Legend: T tokens, I intermediate size, K in features,
N out features.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from . import registry
from .fp8 import reference_fp8_linear
from .silu_mul import reference_silu_mul


class DenseKernels(Protocol):
    def silu_mul(self, gate_TI: torch.Tensor, up_TI: torch.Tensor) -> torch.Tensor:
        """F.silu(gate) * up: [T, I] of the inputs' dtype (strided views are fine)."""
        ...

    def fp8_linear(self, x_TK: torch.Tensor, wq_NK: torch.Tensor, w_scale_inv: torch.Tensor,
                   block: tuple[int, int] = (128, 128), bias_N: torch.Tensor | None = None) -> torch.Tensor:
        """W8A8 block-scaled linear: x quantized per token per Bk channels, w dequantized per block: [T, N]."""
        ...


def _triton() -> dict[str, Any]:
    from .triton_fp8 import triton_fp8_linear
    from .triton_silu_mul import triton_silu_mul

    return dict(silu_mul=triton_silu_mul,  # one launch
                fp8_linear=triton_fp8_linear)


registry.register("dense", DenseKernels, triton=_triton,
                  reference=dict(silu_mul=reference_silu_mul, fp8_linear=reference_fp8_linear))
