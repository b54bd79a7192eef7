"""A mixer's output in one launch, as a strategy the mixer holds (`FusedOutput`): where it takes a step, the
mixer's o_proj, the residual add and the norm before the FFN block run as kernels.linear_add_rms_norm
(kernels/triton_linear_norm.py) instead of a GEMM and a norm launch, the second waiting on the first.

The seam (engine/models/blocks/stream.py `mixer_and_ffn_norm`) asks a mixer's `fusion` two things: `takes(x)`,
whether the mixer runs this step by `forward_fused(norm, post_norm, ..., handoff)` (handed the residual stream,
the norms and the FFN block's FP8 input handoff, if any), and `takes_output(x)`, whether post_norm goes into the
output launch (`project`, which then also writes the FP8 experts' quantized input where there is a handoff).
GQA's FusedInput (gqa_input.py) also takes the input side; MLA's fusion is this one alone (its input already is
one launch: kernels/mla_input.py).

Which steps: up to kernels/norm.py's FUSED_MAX_TOKENS tokens, an o_proj without a LoRA adapter, whole on this
rank (a row-parallel o_proj all-reduces before the add), float or FP8 block-scaled in blocks the GEMV takes
(`gemv_weight`), on the Triton kernels. Host-side facts only: a CUDA graph captured for a batch size always
replays the same path.
"""
from __future__ import annotations

from typing import Any

import torch

from moelink.kernels.fp8 import fp8_gemv_fits
from moelink.kernels.norm import FUSED_MAX_TOKENS
from moelink.moe.fp8_input import Fp8Input

from ..tp.linear import Replicated
from .linear import FloatLinear, Fp8Linear, Linear


def gemv_weight(proj: Linear, widest: int) -> dict[str, Any] | None:
    """The weight keywords the fused decode GEMVs (kernels.linear_add_rms_norm, kernels.norm_qkv_rope_kv, and the
    dense MLP's kernels.gate_up_silu_mul / linear_add: mlp_fusion.py) take for `proj` beside its weight: {} for a
    float weight, an FP8 one's block scales and block (W8A8, as its own kernels.fp8_linear computes it); None where
    they do not take its method: an FP8 block whose Bk is no power of two >= 16, or whose Bn no program of 8 to
    `widest` rows divides (kernels/fp8.py fp8_gemv_fits)."""
    method = proj.method
    if isinstance(method, FloatLinear):
        return {}
    if isinstance(method, Fp8Linear) and fp8_gemv_fits(widest, method.block):
        return dict(w_scale_inv=proj.weight_scale_inv, block=method.block)
    return None

# The activation dtypes the Triton kernels take (float64 runs the references).
FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class FusedOutput:
    """One mixer's output launch: its per-token counters (kernels/triton_linear_norm.token_counters: zeros the
    launch leaves zero, so one tensor serves every step and every captured graph) and the per-step test."""

    def __init__(self, o_proj: Linear, device) -> None:
        self.o_proj = o_proj
        self.counters_T = torch.zeros(FUSED_MAX_TOKENS, dtype=torch.int32, device=device)

    @staticmethod
    def for_mixer(kernels, o_proj: Linear, device, plain: bool) -> FusedOutput | None:
        """The strategy on the Triton kernels for a mixer whose forward is the class's own (`plain`), else None."""
        return FusedOutput(o_proj, device) if getattr(kernels, "name", None) == "triton" and plain else None

    def takes(self, x_TD: torch.Tensor) -> bool:
        """Whether the mixer runs this step fused: exactly when its output launch takes it."""
        return self.takes_output(x_TD)

    def project(self, kernels, o_TO: torch.Tensor, bias_D: torch.Tensor | None, residual_TD: torch.Tensor,
                post_norm, handoff: Fp8Input | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(post_norm(o_proj(o) + residual), o_proj(o) + residual) in one launch (kernels.linear_add_rms_norm);
        where `handoff` (the FFN block's FP8 experts take their input quantized: moe/fp8_input.py) the launch also
        quantizes its normed output (kernels.linear_add_rms_norm_fp8) and hands it over, so neither the norm nor
        the experts run a launch of their own for it."""
        weight = self.weight()
        assert weight is not None  # the caller asked takes_output
        args = (o_TO, self.o_proj.weight, bias_D, residual_TD, post_norm.weight, post_norm.eps)
        if handoff is None:
            return kernels.linear_add_rms_norm(*args, counters_T=self.counters_T, **weight)
        h_TD, summed_TD, hq_TD, hs_TG = kernels.linear_add_rms_norm_fp8(*args, handoff.group,
                                                                         counters_T=self.counters_T, **weight)
        handoff.hand(h_TD, hq_TD, hs_TG)
        return h_TD, summed_TD

    def weight(self) -> dict[str, Any] | None:
        """o_proj's weight keywords for kernels.linear_add_rms_norm (`gemv_weight`), None: not taken."""
        return gemv_weight(self.o_proj, 64)

    def takes_output(self, x_TD: torch.Tensor) -> bool:
        proj = self.o_proj
        return (0 < x_TD.shape[0] <= FUSED_MAX_TOKENS and proj.lora is None and self.weight() is not None
                and isinstance(proj.parallel, Replicated) and x_TD.dtype in FUSED_DTYPES
                and self.counters_T.device == x_TD.device)
