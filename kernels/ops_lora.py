"""The LoRA family of the kernel seam (kernels/ops.py): shrink and expand over rows of mixed adapters, and the
routed experts with per-expert adapters.

References in kernels/lora.py and kernels/lora_moe.py (the contract); Triton in kernels/triton_lora.py and
kernels/triton_lora_moe.py (imported only when a Triton backend is built). Legend: T tokens, K in features, N out
features, R rank, L adapter slots; the experts' as kernels/ops_moe.py's.

`lora_experts_in_graphs` (the Triton loader's, absent from the references): the backend's `lora_fused_moe` makes
no host loop and no device→host sync, so a decode CUDA graph may capture it (engine/lora/experts.py).
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from . import registry
from .lora import reference_lora_expand, reference_lora_shrink
from .lora_moe import ExpertLoRA, reference_lora_fused_moe
from .moe import SILU, MoEActivation


class LoRAKernels(Protocol):
    def lora_shrink(self, x_TK: torch.Tensor, a_LRK: torch.Tensor, slots_T: torch.Tensor) -> torch.Tensor:
        """t[i] = x[i] A[slots[i]]^T, zeros where slots[i] < 0: [T, R]."""
        ...

    def lora_expand(self, y_TN: torch.Tensor, t_TR: torch.Tensor, b_LNR: torch.Tensor, slots_T: torch.Tensor,
                    scale_L: torch.Tensor) -> torch.Tensor:
        """y[i] += scale[slots[i]] · t[i] B[slots[i]]^T where slots[i] >= 0, in place; returns y."""
        ...

    def lora_fused_moe(self, x_TD: torch.Tensor, w13_EFD: torch.Tensor, w2_EDI: torch.Tensor,
                       topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor, slots_T: torch.Tensor,
                       gate_up: ExpertLoRA | None, down: ExpertLoRA | None, *,
                       b13_EF: torch.Tensor | None = None, b2_ED: torch.Tensor | None = None,
                       activation: MoEActivation = SILU) -> torch.Tensor:
        """fused_moe with each expert's gate_up_proj and down_proj carrying the adapter of slots[t] (none where -1;
        a tensor None: no delta on it): [T, D] in x's dtype."""
        ...


def _triton() -> dict[str, Any]:
    from .triton_lora import triton_lora_expand, triton_lora_shrink
    from .triton_lora_moe import triton_lora_fused_moe

    return dict(lora_shrink=triton_lora_shrink, lora_expand=triton_lora_expand, lora_fused_moe=triton_lora_fused_moe,
                lora_experts_in_graphs=True)


registry.register("lora", LoRAKernels, triton=_triton,
                  reference=dict(lora_shrink=reference_lora_shrink, lora_expand=reference_lora_expand,
                                 lora_fused_moe=reference_lora_fused_moe))
