"""The norm family of the kernel seam (kernels/ops.py): RMSNorm, alone and fused with the residual add.

References in kernels/norm.py, Triton in kernels/triton_norm.py (imported only when a Triton backend is built).
Legend: T tokens, D hidden size.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from . import registry
from .norm import reference_add_rms_norm, reference_add_rms_norm_fp8, reference_rms_norm


class NormKernels(Protocol):
    def rms_norm(self, x_TD: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
        """y = weight * (x / rms(x)), the norm in float32: [T, D] in x's dtype."""
        ...

    def add_rms_norm(self, x_TD: torch.Tensor, residual_TD: torch.Tensor, weight_D: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add fused with the norm: (norm(x + residual), x + residual)."""
        ...

    def add_rms_norm_fp8(self, x_TD: torch.Tensor, residual_TD: torch.Tensor, weight_D: torch.Tensor, eps: float,
                         group: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """add_rms_norm and its output quantized for W8A8 FP8 experts, per token and `group` channels:
        (norm(x + residual), x + residual, xq e4m3 [T, D], xs float32 [T, ceil(D / group)]); one launch on a GPU."""
        ...


def _triton() -> dict[str, Any]:
    from .triton_norm import triton_add_rms_norm, triton_add_rms_norm_fp8, triton_rms_norm

    return dict(rms_norm=triton_rms_norm, add_rms_norm=triton_add_rms_norm, add_rms_norm_fp8=triton_add_rms_norm_fp8)


registry.register("norm", NormKernels, triton=_triton,
                  reference=dict(rms_norm=reference_rms_norm, add_rms_norm=reference_add_rms_norm,
                                 add_rms_norm_fp8=reference_add_rms_norm_fp8))
