"""A mixer's output in one launch, as a strategy the mixer holds (`FusedOutput`): where it takes a step, the
mixer's o_proj, the residual add and the norm before the FFN block run as kernels.linear_add_rms_norm
(kernels/triton_linear_norm.py) instead of a GEMM and a norm launch, the second waiting on the first.

The seam (engine/models/blocks/stream.py `mixer_and_ffn_norm`) asks a mixer's `fusion` two things: `takes(x)`,
whether the mixer runs this step by `forward_fused(norm, post_norm, ...)` (handed the residual stream and the
norms), and `takes_output(x)`, whether post_norm goes into the output launch (the caller also keeps it apart
where the FFN block wants its FP8 input from that norm's own launch). GQA's FusedInput (gqa_input.py) also
takes the input side; MLA's fusion is this one alone (its input already is one launch: kernels/mla_input.py).

Which steps: up to kernels/norm.py's FUSED_MAX_TOKENS tokens, a float o_proj without a LoRA adapter, whole on
this rank (a row-parallel o_proj all-reduces before the add), on the Triton kernels. Host-side facts only: a
CUDA graph captured for a batch size always replays the same path.
"""
from __future__ import annotations

import torch

from moelink.kernels.norm import FUSED_MAX_TOKENS

from ..tp.linear import Replicated
from .linear import FloatLinear, Linear

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

    def takes_output(self, x_TD: torch.Tensor) -> bool:
        proj = self.o_proj
        return (0 < x_TD.shape[0] <= FUSED_MAX_TOKENS and proj.lora is None and isinstance(proj.method, FloatLinear)
                and isinstance(proj.parallel, Replicated) and x_TD.dtype in FUSED_DTYPES
                and self.counters_T.device == x_TD.device)
