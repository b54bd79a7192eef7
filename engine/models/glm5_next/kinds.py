"""GLM-5.3-Flash's block kinds (engine/models/blocks/registry.py imports this module): its head. Its attention kinds are the shared ones ("kda", "mla" with a pooled DSA indexer) and its embedding DeepSeek-V4's
"hc_streams" (the embedded token copied into hc_mult streams).

Its residual is the shared "hc_prenorm" (engine/models/blocks/stream.py HyperPreNormLayer: the hyper-connection
streams collapse into the block's input, which input_layernorm / post_attention_layernorm normalise before the
attention under `self_attn.` and the FFN under `mlp.`; the block's output spreads back over the streams). Its own
head, "hc_mean": the streams' plain mean, then the final norm (Glm5NextTextHyperHead).

Under tensor parallelism the hyper-connections are whole on every rank (per token, the same input everywhere).

Legend: T tokens, n streams, D hidden.
"""
from __future__ import annotations

from typing import Any

import torch

from moelink.moe.weight_plan import WeightPlan

from ..blocks.context import BuildContext
from ..blocks.stream import HEAD, Head
from ..hyper_connections import MeanHyperHead
from ..layers import RMSNorm


@HEAD.register("hc_mean")
class MeanHyperHeadBlock(Head):
    """The streams' mean (MeanHyperHead), then the final RMSNorm."""

    def __init__(self, ctx: BuildContext):
        cfg = ctx.cfg
        self.hc_head = MeanHyperHead()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.kernels, cfg.dtype, ctx.device)
        self.modules = {"norm": self.norm}

    def finish(self, state: Any) -> torch.Tensor:
        return self.norm(self.hc_head(state))

    def weight_plan(self) -> WeightPlan:
        return self.norm.weight_plan("model.norm.weight")


__all__ = ["MeanHyperHeadBlock"]
from . import mtp  # noqa: E402,F401  (registers the MTP layout "glm5_next")
