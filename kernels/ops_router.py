"""The router family of the kernel seam (kernels/ops.py): a MoE layer's top-k experts per token.

Reference in kernels/router_topk.py, Triton in kernels/triton_router_topk.py (imported only when a Triton backend is
built). Legend: T tokens, G experts (global), K top-k.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from . import registry
from .router_topk import reference_gate_route_topk, reference_route_topk


class RouterKernels(Protocol):
    def route_topk(self, logits_TG: torch.Tensor, top_k: int, method: str = "greedy", renormalize: bool = False,
                   scale: float = 1.0, n_group: int = 1, topk_group: int = 1, bias_G: torch.Tensor | None = None,
                   valid_T: torch.Tensor | None = None,
                   counts_G: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights_TK float32, ids_TK int64) of `method` (kernels/router_topk.py); updates counts_G in place."""
        ...

    def gate_route_topk(self, x_TD: torch.Tensor, gate_GD: torch.Tensor, gate_bias_G: torch.Tensor | None, top_k: int,
                        method: str = "greedy", renormalize: bool = False, scale: float = 1.0, n_group: int = 1,
                        topk_group: int = 1, bias_G: torch.Tensor | None = None, valid_T: torch.Tensor | None = None,
                        counts_G: torch.Tensor | None = None, counters_T: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The gate matmul, then route_topk: (weights_TK, ids_TK, logits_TG); one launch for a decode batch on a
        GPU (kernels/triton_router_gemv.py)."""
        ...


def _triton() -> dict[str, Any]:
    from .triton_router_gemv import triton_gate_route_topk
    from .triton_router_topk import triton_route_topk

    # route_topk: scores, top-k, padding mask, expert-load count: one launch; gate_route_topk: the gate GEMV too
    return dict(route_topk=triton_route_topk, gate_route_topk=triton_gate_route_topk)


registry.register("router", RouterKernels, triton=_triton,
                  reference=dict(route_topk=reference_route_topk, gate_route_topk=reference_gate_route_topk))
