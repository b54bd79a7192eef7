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
import torch.nn.functional as F

from .fp8 import DEFAULT_BLOCK, per_token_group_quant, reference_fp8_linear


def rms_normalize(x_TD: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) in float32, back in x's dtype: the norm without its weight, for a caller that multiplies its own
    weights in after (as reference_rms_norm's non-float32 path does; the product commutes: the same bits)."""
    if x_TD.dtype == torch.float32:
        return F.rms_norm(x_TD, (x_TD.shape[-1],), None, eps)
    return F.rms_norm(x_TD.to(torch.float32), (x_TD.shape[-1],), None, eps).to(x_TD.dtype)


def reference_rms_norm(x_TD: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * (x / rms(x)); x [T, D] any float dtype → [T, D] same dtype.

    torch's rms_norm runs the same ops as the three-line definition (x * rsqrt(mean(x^2) + eps), bitwise equal) from
    C++: on a CPU a small batch's norm is op dispatch, and this is one Python call where there were six. A
    float32 input takes the weight inside it (the product commutes: the same bits)."""
    D = x_TD.shape[-1]
    if x_TD.dtype == torch.float32 and weight_D.dtype == torch.float32:
        return F.rms_norm(x_TD, (D,), weight_D, eps)
    return weight_D * F.rms_norm(x_TD.to(torch.float32), (D,), None, eps).to(x_TD.dtype)


def reference_add_rms_norm(
    x_TD: torch.Tensor, residual_TD: torch.Tensor, weight_D: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add fused with the norm: returns (norm(x + residual), x + residual)."""
    summed_TD = x_TD + residual_TD
    return reference_rms_norm(summed_TD, weight_D, eps), summed_TD


# The largest batch the GEMV-carried fusions take (kernels/triton_linear_norm.py, kernels/triton_qkv_rope_kv.py):
# each program re-reads its token's inputs from L2 and the T programs of a row block read the same weight rows
# (from L2 after the first); past a few tokens the unfused GEMM (one weight read for every token) wins.
FUSED_MAX_TOKENS = 8


def reference_linear_add_rms_norm(
    x_TK: torch.Tensor, w_DK: torch.Tensor, bias_D: torch.Tensor | None, residual_TD: torch.Tensor,
    norm_D: torch.Tensor, eps: float, counters_T: torch.Tensor | None = None, *,
    w_scale_inv: torch.Tensor | None = None, block: tuple[int, int] = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear, then the residual add fused with the norm: (norm(y + residual), y + residual), y = x w_DKᵀ
    (+ bias). The attention's o_proj and the norm before the FFN block as one op (one launch for a decode batch:
    kernels/triton_linear_norm.py). counters_T: that launch's per-token counters, unused here. w_scale_inv: w_DK
    is an FP8 weight with these block scales (`block`), y the W8A8 linear (fp8.reference_fp8_linear)."""
    if w_scale_inv is None:
        y_TD = F.linear(x_TK, w_DK, bias_D)
    else:
        y_TD = reference_fp8_linear(x_TK, w_DK, w_scale_inv, block, bias_D)
    return reference_add_rms_norm(y_TD, residual_TD, norm_D, eps)


def reference_linear_add_rms_norm_fp8(
    x_TK: torch.Tensor, w_DK: torch.Tensor, bias_D: torch.Tensor | None, residual_TD: torch.Tensor,
    norm_D: torch.Tensor, eps: float, group: int = 128, counters_T: torch.Tensor | None = None, *,
    w_scale_inv: torch.Tensor | None = None, block: tuple[int, int] = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """reference_linear_add_rms_norm, and its normed output quantized for W8A8 FP8 experts
    (fp8.per_token_group_quant, per token and `group` channels): (h, sum, hq float8_e4m3fn [T, D], hs float32
    [T, ceil(D / group)]), what add_rms_norm_fp8 gives after a separate linear (kernels/triton_linear_norm.py: one
    launch for a decode batch)."""
    h_TD, summed_TD = reference_linear_add_rms_norm(x_TK, w_DK, bias_D, residual_TD, norm_D, eps, counters_T,
                                                    w_scale_inv=w_scale_inv, block=block)
    hq_TD, hs_TG = per_token_group_quant(h_TD, group)
    return h_TD, summed_TD, hq_TD, hs_TG


def reference_add_rms_norm_fp8(
    x_TD: torch.Tensor, residual_TD: torch.Tensor, weight_D: torch.Tensor, eps: float, group: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """reference_add_rms_norm, and its output quantized for W8A8 FP8 experts as they would quantize it themselves
    (fp8.per_token_group_quant: per token, per `group` channels, scale amax / 448): (norm(x + residual),
    x + residual, xq float8_e4m3fn [T, D], xs float32 [T, ceil(D / group)]). The norm before the MoE gives the FP8
    experts their input ready (kernels/triton_norm.py does it in the norm's own launch); the router still reads
    the norm's output in x's dtype."""
    y_TD, summed_TD = reference_add_rms_norm(x_TD, residual_TD, weight_D, eps)
    xq_TD, xs_TG = per_token_group_quant(y_TD, group)
    return y_TD, summed_TD, xq_TD, xs_TG
