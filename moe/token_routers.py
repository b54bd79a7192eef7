"""DeepSeek-V4's routing strategies (issue 45): sqrt(softplus) scores, selected on scores + a correction bias, or by
a fixed token-id table (its "hash MoE" layers: `tid2eid[input_ids]`). The MoE layer that routes with the step's token
ids beside its activations is moe/token_routing.py.

Both strategies share one call signature, `router(router_logits_TG, bias_G, token_ids_T) -> (weights_TK, ids_TK)`;
the weights are always the chosen experts' sqrt(softplus) scores renormalised (denominator + 1e-20) and scaled by
routed_scaling_factor, in the logits' dtype, op for op as transformers' DeepseekV4TopKRouter / DeepseekV4HashRouter.
The token ids come in as an argument of the layer's `stages` (typed, per step; never a global), so a hash-routed
layer under expert parallelism dispatches by the ids it was given: no router GEMM decides where a token goes.

Legend: T tokens, G experts, K top-k, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F


def sqrtsoftplus(logits_TG: torch.Tensor) -> torch.Tensor:
    """transformers' ACT2FN["sqrtsoftplus"]: sqrt(softplus(x))."""
    return torch.sqrt(F.softplus(logits_TG))


def _weights(scores_TG: torch.Tensor, ids_TK: torch.Tensor, scale: float) -> torch.Tensor:
    w_TK = scores_TG.gather(1, ids_TK)
    return w_TK / (w_TK.sum(dim=-1, keepdim=True) + 1e-20) * scale


class TokenRouter(Protocol):
    """The router of a TokenRoutedMoELayer (module docstring): `side` is the correction bias or the token-id table."""

    top_k: int
    float32_logits: bool
    needs_bias: ClassVar[bool]
    needs_table: ClassVar[bool]

    def __call__(self, router_logits_TG: torch.Tensor, side: torch.Tensor | None, token_ids_T: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def route_args(self) -> dict | None: ...


@dataclass(frozen=True)
class SqrtSoftplusRouter:
    """Top-k of sqrt(softplus(logits)) + bias_G (the checkpoint's `gate.bias`, float32); the weights are the
    unbiased scores of the chosen experts."""

    top_k: int
    routed_scaling_factor: float = 1.0
    float32_logits: bool = False
    needs_bias: ClassVar[bool] = True
    needs_table: ClassVar[bool] = False

    def route_args(self) -> dict:
        """The fused router op's arguments (kernels/router_topk.py "sqrtsoftplus": scores, top-k on scores + bias,
        renormalisation, scale, padding rows and the load count in one launch with the Triton kernels)."""
        return {"method": "sqrtsoftplus", "renormalize": True, "scale": self.routed_scaling_factor}

    def __call__(self, router_logits_TG, bias_G=None, token_ids_T=None):
        scores_TG = sqrtsoftplus(router_logits_TG)
        biased_TG = scores_TG if bias_G is None else scores_TG + bias_G
        ids_TK = torch.topk(biased_TG, self.top_k, dim=-1, sorted=False).indices
        return _weights(scores_TG, ids_TK, self.routed_scaling_factor), ids_TK


@dataclass(frozen=True)
class HashRouter:
    """The experts of a token are `table_VK[token id]` (the checkpoint's `gate.tid2eid`); the gate's scores only
    weight them. `__call__` takes the table beside the ids (the layer holds it: it is a loaded tensor)."""

    top_k: int
    routed_scaling_factor: float = 1.0
    float32_logits: bool = False
    needs_bias: ClassVar[bool] = False
    needs_table: ClassVar[bool] = True

    def route_args(self) -> None:
        return None

    def __call__(self, router_logits_TG, table_VK, token_ids_T):
        if token_ids_T is None:
            raise ValueError("HashRouter needs the step's token ids: a hash-routed MoE layer routes by token id.")
        ids_TK = table_VK[token_ids_T.long()].long()
        return _weights(sqrtsoftplus(router_logits_TG), ids_TK, self.routed_scaling_factor), ids_TK


__all__ = ["HashRouter", "SqrtSoftplusRouter", "TokenRouter", "sqrtsoftplus"]
