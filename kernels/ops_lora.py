"""The LoRA family of the kernel seam (kernels/ops.py): shrink and expand over rows of mixed adapters.

References in kernels/lora.py (the contract); Triton in kernels/triton_lora.py (imported only when a Triton backend
is built). Legend: T tokens, K in features, N out features, R rank, L adapter slots.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from . import registry
from .lora import reference_lora_expand, reference_lora_shrink


class LoRAKernels(Protocol):
    def lora_shrink(self, x_TK: torch.Tensor, a_LRK: torch.Tensor, slots_T: torch.Tensor) -> torch.Tensor:
        """t[i] = x[i] A[slots[i]]^T, zeros where slots[i] < 0: [T, R]."""
        ...

    def lora_expand(self, y_TN: torch.Tensor, t_TR: torch.Tensor, b_LNR: torch.Tensor, slots_T: torch.Tensor,
                    scale_L: torch.Tensor) -> torch.Tensor:
        """y[i] += scale[slots[i]] · t[i] B[slots[i]]^T where slots[i] >= 0, in place; returns y."""
        ...


def _triton() -> dict[str, Any]:
    from .triton_lora import triton_lora_expand, triton_lora_shrink

    return dict(lora_shrink=triton_lora_shrink, lora_expand=triton_lora_expand)


registry.register("lora", LoRAKernels, triton=_triton,
                  reference=dict(lora_shrink=reference_lora_shrink, lora_expand=reference_lora_expand))
