"""RMSNorm references.

Legend: T tokens, D hidden size.

The norm is computed in float32 whatever the activation dtype, then cast back
before the weight multiply. That is the Hugging Face definition of these
models (Qwen3-MoE, Mixtral): it upcasts bf16 for accuracy, and it *downcasts*
float64. We follow it exactly so that float64 runs reproduce `transformers`
token for token.
"""
from __future__ import annotations

import torch


def reference_rms_norm(x_TD: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * (x / rms(x)); x [T, D] any float dtype → [T, D] same dtype."""
    x32_TD = x_TD.to(torch.float32)
    var_T1 = x32_TD.pow(2).mean(-1, keepdim=True)
    return weight_D * (x32_TD * torch.rsqrt(var_T1 + eps)).to(x_TD.dtype)


def reference_add_rms_norm(
    x_TD: torch.Tensor, residual_TD: torch.Tensor, weight_D: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add fused with the norm: returns (norm(x + residual), x + residual)."""
    summed_TD = x_TD + residual_TD
    return reference_rms_norm(summed_TD, weight_D, eps), summed_TD
