"""Hunyuan Hy4's residual and head kinds (engine/models/blocks/registry.py imports this module): independent
hyper-connections around pre-norm blocks.

"independent_hyper" (IndependentHyperLayer, the shared "hc_prenorm" layer of engine/models/blocks/stream.py with
Tencent's weight names): the hc_mult streams collapse (DeepSeek-V4's HyperConnection with HyperConnectionConfig comb
False: engine/models/hyper_connections.py) into the block input, which
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

from typing import Any

import torch

from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ..blocks.context import BuildContext
from ..blocks.stream import HEAD, RESIDUAL, Head, HyperPreNormLayer
from ..hyper_connections import HyperConnection, HyperHead
from ..layers import RMSNorm


def _hc_plan(hc: HyperConnection, p: str) -> WeightPlan:
    return {p + "fn": PlanEntry(hc.fn_MnD, ()), p + "base": PlanEntry(hc.base_M, ()),
            p + "scale": PlanEntry(hc.scale_3, ())}


@RESIDUAL.register("independent_hyper")
class IndependentHyperLayer(HyperPreNormLayer):
    """The shared hyper-connected pre-norm layer (engine/models/blocks/stream.py; its HyperConnectionConfig has
    `comb` False: no mixing matrix) with Tencent's names for the hyper-connection weights: attn_hc.{fn, base,
    scale}, ffn_hc.{...}."""

    def hc_plan(self, p: str) -> WeightPlan:
        return {**_hc_plan(self.attn_hc, p + "attn_hc."), **_hc_plan(self.ffn_hc, p + "ffn_hc.")}


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
from . import mtp  # noqa: E402,F401  (registers the MTP layout "hy_v4")
