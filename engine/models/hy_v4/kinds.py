"""Hunyuan Hy4's residual and head kinds (engine/models/blocks/registry.py imports this module): independent
hyper-connections around pre-norm blocks.

"independent_hyper" (IndependentHyperLayer): the hc_mult streams collapse (DeepSeek-V4's HyperConnection with
HyperConnectionConfig comb False: engine/models/hyper_connections.py) into the block input, which
input_layernorm / post_attention_layernorm (the weighted RMSNorm of every pre-norm family) normalise before the
attention / FFN block; the block's output spreads back over the streams, each stream keeping itself (no mixing
matrix: the expansion kernel runs with the identity). As transformers' HYV4DecoderLayer:

    post, h = attn_hc(x);  x = x + post * attn(input_layernorm(h))
    post, h = ffn_hc(x);   x = x + post * ffn(post_attention_layernorm(h))

"hc_head_rms" (HyperHeadRMS): the streams' last collapse (HyperHead), then the model's weighted RMSNorm; the LM head
is lm_head.weight, held and run in float32 under a half model (transformers' _keep_in_fp32_modules_strict). The embedding kind is DeepSeek-V4's "hc_streams" (each token's embedding copied to every stream).
Checkpoint names as transformers' modules have them (attn_hc.fn, hc_head.hc_fn, ...); the published ones
(hc_pre.hc_attn_layer.hc_fn, ...) through config.py's aliases.

Legend: T tokens, n streams, D hidden.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from moelink.moe.layer import Stages
from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ..blocks.attention import AttentionKind
from ..blocks.context import BuildContext
from ..blocks.ffn import FFNBlock, ffn_stages
from ..blocks.stream import HEAD, RESIDUAL, Head, Layer
from ..hyper_connections import HyperConnection, HyperHead
from ..layers import AuxCapture, ForwardContext, RMSNorm


def _hc_plan(hc: HyperConnection, p: str) -> WeightPlan:
    return {p + "fn": PlanEntry(hc.fn_MnD, ()), p + "base": PlanEntry(hc.base_M, ()),
            p + "scale": PlanEntry(hc.scale_3, ())}


@RESIDUAL.register("independent_hyper")
class IndependentHyperLayer(Layer):
    """Hyper-connections around pre-norm attention and FFN blocks (module docstring): the stream is x_TnD."""

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
        plan: WeightPlan = {**_hc_plan(self.attn_hc, p + "attn_hc."), **_hc_plan(self.ffn_hc, p + "ffn_hc.")}
        plan.update(self.input_layernorm.weight_plan(p + "input_layernorm.weight"))
        plan.update(self.post_attention_layernorm.weight_plan(p + "post_attention_layernorm.weight"))
        plan.update(self.mixer.weight_plan(f"{p}{self.mixer_name}."))
        plan.update(self.ffn.weight_plan(p, layer_idx, cfg, spec, expert_ids, names))
        return plan

    @staticmethod
    def capture(aux: AuxCapture, n: int, state: Any) -> None:
        """The streams flat, [T, n D] (as DeepSeek-V4's HyperLayer)."""
        aux.take(n, state.flatten(1), None)


@HEAD.register("hc_head_rms")
class HyperHeadRMS(Head):
    """HyperHead's collapse, then the model's RMSNorm (model.norm.weight); the LM head in float32 under a half model,
    as transformers' HYV4ForCausalLM keeps it."""

    lm_head_float32 = True

    def __init__(self, ctx: BuildContext):
        cfg = ctx.cfg
        assert cfg.hyper_connections is not None  # IndependentHyperLayer refused the model first
        self.hc_head = HyperHead(cfg.hyper_connections, cfg.hidden_size, cfg.rms_norm_eps, ctx.device)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.kernels, cfg.dtype, ctx.device)
        self.modules = {"hc_head": self.hc_head, "norm": self.norm}

    def finish(self, state: Any) -> torch.Tensor:
        return self.norm(self.hc_head(state))

    def weight_plan(self) -> WeightPlan:
        return {**self.norm.weight_plan("model.norm.weight"), **self.hc_head.weight_plan("model.hc_head.")}


__all__ = ["HyperHeadRMS", "IndependentHyperLayer"]
