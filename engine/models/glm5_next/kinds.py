"""GLM-5.3-Flash's block kinds (engine/models/blocks/registry.py imports this module): its residual wiring and its
head. Its attention kinds are the shared ones ("kda", "mla" with a pooled DSA indexer) and its embedding DeepSeek-V4's
"hc_streams" (the embedded token copied into hc_mult streams).

"hc_prenorm" (HyperPreNormLayer): the hyper-connection streams (engine/models/hyper_connections.py, DeepSeek-V4's
math) collapse into the block's input, which input_layernorm / post_attention_layernorm normalise (transformers'
RMSNorm, as the prenorm layer's) before the attention under `self_attn.` and the FFN under `mlp.`; the block's output
spreads back over the streams. "hc_mean": the streams' plain mean, then the final norm (Glm5NextTextHyperHead).

Under tensor parallelism the hyper-connections are whole on every rank (per token, the same input everywhere).

Legend: T tokens, n streams, D hidden.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from moelink.moe.layer import Stages
from moelink.moe.weight_plan import WeightPlan

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ..blocks.attention import AttentionKind
from ..blocks.context import BuildContext
from ..blocks.ffn import FFNBlock, ffn_stages
from ..blocks.stream import HEAD, RESIDUAL, Head, Layer
from ..hyper_connections import HyperConnection, MeanHyperHead
from ..layers import AuxCapture, ForwardContext, RMSNorm


@RESIDUAL.register("hc_prenorm")
class HyperPreNormLayer(Layer):
    """Hyper-connections around the attention and the FFN block, each behind its checkpoint's RMSNorm: the stream
    is x_TnD."""

    def __init__(self, ctx: BuildContext, i: int, attention: AttentionKind, attn_cfg: Any,
                 ffn: Callable[[BuildContext, int], FFNBlock]):
        super().__init__(ctx)
        cfg = ctx.cfg
        hc, D, eps = cfg.hyper_connections, cfg.hidden_size, cfg.rms_norm_eps
        if hc is None:
            raise ValueError(f"architecture {cfg.architecture}: its ModelConfig has no hyper_connections.")
        self.attn_hc = HyperConnection(hc, D, eps, ctx.device, ctx.kernels)
        self.ffn_hc = HyperConnection(hc, D, eps, ctx.device, ctx.kernels)
        self.input_layernorm = RMSNorm(D, eps, ctx.kernels, cfg.dtype, ctx.device)
        self.post_attention_layernorm = RMSNorm(D, eps, ctx.kernels, cfg.dtype, ctx.device)
        self.install(ctx, i, attention, attn_cfg, ffn)

    def stages(self, positions_T: torch.Tensor, state: Any, input_ids_T: torch.Tensor | None,
               ctx: ForwardContext) -> Stages:
        x_TnD = state
        h_TD, mix = self.attn_hc.collapse(x_TnD)
        x_TnD = self.attn_hc.residual(x_TnD, self.mixer(positions_T, self.input_layernorm(h_TD), ctx), mix)
        h_TD, mix = self.ffn_hc.collapse(x_TnD)
        y_TD = yield from ffn_stages(self.ffn, self.tp, self.post_attention_layernorm(h_TD), input_ids_T)
        return self.ffn_hc.residual(x_TnD, y_TD, mix)

    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        """hc_attn_* / hc_ffn_* (as save_pretrained writes them back), the two norms, the mixer and the FFN block."""
        plan: WeightPlan = {**self.attn_hc.weight_plan(p + "hc_attn"), **self.ffn_hc.weight_plan(p + "hc_ffn")}
        plan.update(self.input_layernorm.weight_plan(p + "input_layernorm.weight"))
        plan.update(self.post_attention_layernorm.weight_plan(p + "post_attention_layernorm.weight"))
        plan.update(self.mixer.weight_plan(f"{p}{self.mixer_name}."))
        plan.update(self.ffn.weight_plan(p, layer_idx, cfg, spec, expert_ids, names))
        return plan

    @staticmethod
    def capture(aux: AuxCapture, n: int, state: Any) -> None:
        """The streams flat, [T, n D]."""
        aux.take(n, state.flatten(1), None)


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


__all__ = ["HyperPreNormLayer", "MeanHyperHeadBlock"]
