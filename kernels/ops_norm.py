"""The norm family of the kernel seam (kernels/ops.py): RMSNorm, alone, fused with the residual add, and after a
linear (a decode batch's o_proj).

References in kernels/norm.py, Triton in kernels/triton_norm.py (imported only when a Triton backend is built).
Legend: T tokens, D hidden size.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from . import registry
from .norm import (reference_add_rms_norm, reference_add_rms_norm_fp8, reference_linear_add_rms_norm,
                   reference_linear_add_rms_norm_fp8, reference_rms_norm)


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

    def linear_add_rms_norm(self, x_TK: torch.Tensor, w_DK: torch.Tensor, bias_D: torch.Tensor | None,
                            residual_TD: torch.Tensor, norm_D: torch.Tensor, eps: float,
                            counters_T: torch.Tensor | None = None, *, w_scale_inv: torch.Tensor | None = None,
                            block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
        """A linear, then add_rms_norm: (norm(y + residual), y + residual), y = x w_DKᵀ (+ bias), or the W8A8 FP8
        linear where w_scale_inv (w_DK e4m3 in `block` scale blocks); one launch for a decode batch on a GPU (the
        attention's o_proj and the norm before the FFN block)."""
        ...


    def linear_add_rms_norm_fp8(self, x_TK: torch.Tensor, w_DK: torch.Tensor, bias_D: torch.Tensor | None,
                                residual_TD: torch.Tensor, norm_D: torch.Tensor, eps: float, group: int = 128,
                                counters_T: torch.Tensor | None = None, *, w_scale_inv: torch.Tensor | None = None,
                                block: tuple[int, int] = (128, 128)
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """linear_add_rms_norm, and its normed output quantized for W8A8 FP8 experts per token and `group`
        channels (as add_rms_norm_fp8): (h, y + residual, hq e4m3 [T, D], hs float32 [T, ceil(D / group)]); one
        launch for a decode batch on a GPU."""
        ...


def _triton() -> dict[str, Any]:
    from .triton_linear_norm import triton_linear_add_rms_norm, triton_linear_add_rms_norm_fp8
    from .triton_norm import triton_add_rms_norm, triton_add_rms_norm_fp8, triton_rms_norm

    # linear_add_rms_norm(_fp8): the GEMV, the norm (and its quantized copy): one launch
    return dict(rms_norm=triton_rms_norm, add_rms_norm=triton_add_rms_norm, add_rms_norm_fp8=triton_add_rms_norm_fp8,
                linear_add_rms_norm=triton_linear_add_rms_norm,
                linear_add_rms_norm_fp8=triton_linear_add_rms_norm_fp8)


registry.register("norm", NormKernels, triton=_triton,
                  reference=dict(rms_norm=reference_rms_norm, add_rms_norm=reference_add_rms_norm,
                                 add_rms_norm_fp8=reference_add_rms_norm_fp8,
                                 linear_add_rms_norm=reference_linear_add_rms_norm,
                                 linear_add_rms_norm_fp8=reference_linear_add_rms_norm_fp8))
