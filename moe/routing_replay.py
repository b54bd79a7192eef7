"""Rollout routing replay's other half (R3; SamplingParams.forced_routed_experts): a prefill told which experts each
of its tokens uses in every MoE layer, instead of its router's top-k, so that a trainer's forward and the rollout run
the same experts (issue 58 item 3; moe/routing_capture.py records them).

Legend: L MoE layers, T the step's tokens, K top-k, G routed experts.

The runner hands each step's given ids as one device tensor [L, T, K] (int32, logical expert ids; a row of -1: the
router's own choice for that token) before the forward (`begin_step`), or None when no row of the step is given. Each
MoE layer takes its next T rows (`take`: two micro-batches call a layer twice per step, the first micro-batch's
tokens first, as the capture counts them). Only the selection is replayed: a token's weights are its router's scores
gathered at the given experts from the full scores, per the router's scoring (softmax, sigmoid; bias-free), then
renormalised and scaled as the router does, never the zeros a top-k mask would leave at experts it did not pick
(Megatron's and NeMo's R3 take the same rule). Steps with given rows run eagerly (a decode graph does not replay
this).
"""
from __future__ import annotations

import torch

from .router import (SigmoidGroupLimitedRouter, SoftmaxBiasedRouter, SoftmaxGroupLimitedRouter, SoftmaxTopKRouter,
                     TopKSoftmaxRouter)


class RoutingReplay:
    """One step's given routing of every MoE layer of a rank's model."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.forced_LTK: torch.Tensor | None = None
        self._offsets = [0] * num_layers

    def begin_step(self, forced_LTK: torch.Tensor | None) -> None:
        """This step's given ids [L, T, K] (int32 on the device), or None: every layer routes on its own."""
        self.forced_LTK = forced_LTK
        self._offsets = [0] * self.num_layers

    def take(self, layer: int, num_rows: int) -> torch.Tensor | None:
        """Layer `layer`'s given ids of its next `num_rows` rows [T, K], or None when the step gives none."""
        if self.forced_LTK is None:
            return None
        start = self._offsets[layer]
        self._offsets[layer] = start + num_rows
        return self.forced_LTK[layer, start:start + num_rows]


def replayed_weights(router, logits_TG: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
    """The weights `router` gives experts `ids_TK` (valid ids; float32, float64 where the router keeps float64):
    its scores over every expert, gathered at the ids, renormalised and scaled as its own top-k's would be."""
    if isinstance(router, TopKSoftmaxRouter):  # gpt-oss: a softmax over the chosen logits alone
        chosen_TK = logits_TG.gather(1, ids_TK)
        weights_TK = torch.softmax(chosen_TK, dim=-1, dtype=chosen_TK.dtype)
        return weights_TK if weights_TK.dtype == torch.float64 else weights_TK.float()
    if isinstance(router, SoftmaxBiasedRouter):  # LongCat-Flash: softmax scores, noaux_tc's renormalisation
        scores_TG = torch.softmax(logits_TG.float(), dim=-1)
        return _renormalized(scores_TG.gather(1, ids_TK), router.norm_topk_prob, 1e-20) * router.routed_scaling_factor
    if isinstance(router, SigmoidGroupLimitedRouter):  # DeepSeek-V3 noaux_tc: the unbiased sigmoid scores
        scores_TG = torch.sigmoid(logits_TG.float())
        return _renormalized(scores_TG.gather(1, ids_TK), router.norm_topk_prob, 1e-20) * router.routed_scaling_factor
    if isinstance(router, SoftmaxGroupLimitedRouter):
        scores_TG = torch.softmax(logits_TG.float(), dim=-1)
        return _renormalized(scores_TG.gather(1, ids_TK), router.renormalize, 1e-20) * router.routed_scaling_factor
    if isinstance(router, SoftmaxTopKRouter):
        weights_TK = torch.softmax(logits_TG.float(), dim=-1).gather(1, ids_TK)
        weights_TK = _renormalized(weights_TK, router.renormalize, 0.0)
        return weights_TK * router.routed_scaling_factor if router.routed_scaling_factor != 1.0 else weights_TK
    raise ValueError(f"routing replay is not supported for the router {type(router).__name__}.")


def _renormalized(weights_TK: torch.Tensor, renormalize: bool, eps: float) -> torch.Tensor:
    if not renormalize:
        return weights_TK
    total_T1 = weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK / (total_T1 + eps) if eps else weights_TK / total_T1


def apply(router, logits_TG: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor,
          forced_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, ids) with the rows `forced_TK` gives (those not -1) replaced by the given ids and their weights."""
    given_T1 = forced_TK[:, :1] >= 0
    ids = torch.where(given_T1, forced_TK.to(ids_TK.dtype), ids_TK)
    replayed_TK = replayed_weights(router, logits_TG, ids.clamp(min=0)).to(weights_TK.dtype)
    return torch.where(given_T1, replayed_TK, weights_TK), ids


def supports(router) -> bool:
    """Whether a layer with this router can replay given routing (the routers of moe/router.py)."""
    return isinstance(router, (TopKSoftmaxRouter, SigmoidGroupLimitedRouter, SoftmaxGroupLimitedRouter,
                               SoftmaxTopKRouter))


__all__ = ["RoutingReplay", "apply", "replayed_weights", "supports"]
