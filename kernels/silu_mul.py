"""SiLU(gate) · up, the gated activation of dense MLPs and shared experts (the MoE kernels fuse theirs into the
gate-up GEMM's epilogue). Reference: plain torch, as the models compute it (two ops, two roundings: SiLU rounded
to the activations' dtype, then the product); kernels/triton_silu_mul.py does it in one launch.

Legend: T tokens, I intermediate size.

Why: at batch 1 the two ops are two dependent launches of a few kB each per dense MLP (DeepSeek's shared
experts: every MoE layer).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_silu_mul(gate_TI: torch.Tensor, up_TI: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up: [T, I] of the inputs' dtype (strided views, e.g. the halves of gate_up_proj, are fine)."""
    return F.silu(gate_TI) * up_TI
