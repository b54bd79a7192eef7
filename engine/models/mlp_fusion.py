"""A dense MLP's decode step in two launches, as a strategy the MLP holds (`FusedMLP`): where it takes a step,
gate_up_proj and SiLU·up run as kernels.gate_up_silu_mul and down_proj (with an addend: the routed experts' sum,
for DeepSeek's shared experts) as kernels.linear_add (kernels/triton_mlp_gemv.py), instead of a GEMM, the
activation launch, a GEMM and the add (six launches with FP8 weights: their two activation quantizations too).

Which MLPs: SiLU-gated ones (not a family's own activation) on the Triton kernels. Which steps: up to
kernels/norm.py's FUSED_MAX_TOKENS tokens in a dtype the kernels take, both projections whole on this rank
(tensor parallelism splits them: the all-reduce sits between), without LoRA adapters, float or FP8 in blocks the
GEMV takes (fused_output.gemv_weight). Host-side facts only: a CUDA graph captured for a batch size always
replays the same path.
"""
from __future__ import annotations

from typing import Any

import torch

from moelink.kernels.norm import FUSED_MAX_TOKENS

from ..tp.linear import Replicated
from .fused_output import FUSED_DTYPES, gemv_weight
from .linear import Linear


class FusedMLP:
    """One MLP's two decode launches (kernels.gate_up_silu_mul, kernels.linear_add) and the per-step test."""

    def __init__(self, kernels: Any, gate_up_proj: Linear, down_proj: Linear, inter: int) -> None:
        self.kernels, self.gate_up_proj, self.down_proj, self.inter = kernels, gate_up_proj, down_proj, inter

    @staticmethod
    def for_mlp(kernels: Any, gate_up_proj: Linear, down_proj: Linear, inter: int, silu: bool) -> FusedMLP | None:
        """The strategy on the Triton kernels for a SiLU-gated MLP (`silu`), else None."""
        return FusedMLP(kernels, gate_up_proj, down_proj, inter) if getattr(kernels, "name", None) == "triton" \
            and silu else None

    def takes(self, x_TD: torch.Tensor) -> bool:
        """Whether this step runs the two launches (host-side facts only: no sync)."""
        return (0 < x_TD.shape[0] <= FUSED_MAX_TOKENS and x_TD.dtype in FUSED_DTYPES
                and all(p.lora is None and isinstance(p.parallel, Replicated) and gemv_weight(p, 64) is not None
                        for p in (self.gate_up_proj, self.down_proj)))

    def forward(self, x_TD: torch.Tensor, addend_TD: torch.Tensor | None = None) -> torch.Tensor:
        """down(SiLU(gate(x)) · up(x)) (+ addend), [T, D]; only where `takes` the step."""
        gu, down = self.gate_up_proj, self.down_proj
        h_TI = self.kernels.gate_up_silu_mul(x_TD, gu.weight, self.inter, gu.starts[1], **gemv_weight(gu, 64))
        return self.kernels.linear_add(h_TI, down.weight, addend_TD, **gemv_weight(down, 64))
