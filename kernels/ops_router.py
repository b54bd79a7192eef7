"""The router family of the kernel seam (kernels/ops.py): a MoE layer's top-k experts per token.

Reference in kernels/router_topk.py, Triton in kernels/triton_router_topk.py (imported only when a Triton backend is
built). Legend: T tokens, G experts (global), K top-k.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from . import registry
from .router_topk import reference_route_topk


class RouterKernels(Protocol):
    def route_topk(self, logits_TG: torch.Tensor, top_k: int, method: str = "greedy", renormalize: bool = False,
                   scale: float = 1.0, n_group: int = 1, topk_group: int = 1, bias_G: torch.Tensor | None = None,
                   valid_T: torch.Tensor | None = None,
                   counts_G: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights_TK float32, ids_TK int64) of `method` (kernels/router_topk.py); updates counts_G in place."""
        ...


def _triton() -> dict[str, Any]:
    from .triton_router_topk import triton_route_topk

    return dict(route_topk=triton_route_topk)  # scores, top-k, padding mask, expert-load count: one launch


registry.register("router", RouterKernels, triton=_triton, reference=dict(route_topk=reference_route_topk))
