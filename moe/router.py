"""Routers: from router logits to (top-k weights, top-k expert ids), one strategy per scheme.

Legend: T tokens, E experts, K top-k.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SoftmaxTopKRouter:
    """Softmax over all experts, keep the top-k, optionally renormalise them to sum to 1.

    Qwen3-MoE (`norm_topk_prob`) and Mixtral (always renormalised, which equals
    a softmax over the top-k logits). The softmax runs in float32 as in the
    reference models, which matters for exact parity in float64.
    """

    top_k: int
    renormalize: bool

    def __call__(self, router_logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (weights_TK float32, ids_TK int64)."""
        probs_TE = torch.softmax(router_logits_TE.float(), dim=-1)
        weights_TK, ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return weights_TK, ids_TK
