"""The MoE layer whose router reads the step's token ids beside its activations (DeepSeek-V4's hash-routed layers;
the strategies are moe/token_routers.py). The ids come in as an argument of `stages` (typed, per step; never a
global), so a hash-routed layer under expert parallelism dispatches by the ids it was given: no router GEMM decides
where a token goes.

Legend: T tokens, G experts, K top-k, V vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layer import MoELayer, Stages, run_stages
from .token_routers import HashRouter, SqrtSoftplusRouter, TokenRouter  # noqa: F401 (the layer's strategies)


class TokenRoutedMoELayer(MoELayer):
    """A MoELayer whose router may read the step's token ids (`stages(x_TD, token_ids_T)`); the experts, the
    expert formats, expert parallelism and the load counters are MoELayer's. A hash router's table is
    `tid2eid_VK` (int64 [V, K]), loaded with the layer."""

    router: TokenRouter  # MoELayer's Router, with the token ids beside the logits

    def __init__(self, *args, vocab_size: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.tid2eid_VK = (nn.Parameter(torch.zeros(vocab_size, self.router.top_k, dtype=torch.long,
                                                    device=self.gate_GD.device), requires_grad=False)
                           if self.router.needs_table else None)

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> torch.Tensor:
        return run_stages(self.stages(x_TD, token_ids_T))

    def route(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights_TK, ids_TK) of this step's tokens; padding rows (valid_rows_T) route to no expert (-1)."""
        logits_TG = F.linear(x_TD.to(self.gate_GD.dtype), self.gate_GD)
        route = self.router.route_args()
        if route is not None:  # learned routing: the fused router op (MoELayer.stages does the same)
            counts_G = self.stats.routing_counts(self.moe_index) if self.stats is not None else None
            return self.kernels.route_topk(logits_TG, self.router.top_k, **route,
                                           bias_G=self.e_score_correction_bias_G, valid_T=self.valid_rows_T,
                                           counts_G=counts_G)
        side = self.tid2eid_VK if self.router.needs_table else self.e_score_correction_bias_G
        weights_TK, ids_TK = self.router(logits_TG, side, token_ids_T)
        if self.valid_rows_T is not None:
            ids_TK = ids_TK.masked_fill(~self.valid_rows_T[:, None], -1)
        if self.stats is not None:
            self.stats.record_routing(self.moe_index, ids_TK)
        return weights_TK, ids_TK

    def stages(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Stages:
        weights_TK, ids_TK = self.route(x_TD, token_ids_T)
        if self.ep is None:
            return self.expert_format.run(self.kernels, self, x_TD, weights_TK, ids_TK)
        return (yield from self._forward_ep(x_TD, weights_TK, ids_TK))


__all__ = ["HashRouter", "SqrtSoftplusRouter", "TokenRoutedMoELayer"]
