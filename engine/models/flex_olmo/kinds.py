"""FlexOlmo's block kinds (engine/models/blocks/registry.py imports this module): the residual kind "flex_olmo",
OLMo 2's post-norm layer (h = x + post_attention_layernorm(attn(x)); out = h + post_feedforward_layernorm(ffn(h)):
no norm before either block; the stream is (x, None), the attention never takes the fused decode input, whose launch
norms its input), and the head kind "flex_olmo" (the final RMSNorm of the stream)."""
from __future__ import annotations

import torch

from moelink.moe.layer import Stages
from moelink.moe.weight_plan import WeightPlan

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ..blocks.context import BuildContext
from ..blocks.ffn import ffn_stages
from ..blocks.stream import HEAD, RESIDUAL, Layer, PlainHead, StreamState
from ..layers import AuxCapture, ForwardContext, RMSNorm

_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")


@RESIDUAL.register("flex_olmo")
class FlexOlmoLayer(Layer):
    """The module docstring's layer."""

    def __init__(self, ctx: BuildContext, i: int, attention, attn_cfg, ffn):
        super().__init__(ctx)
        cfg = ctx.cfg
        for name in _NORMS:
            setattr(self, name, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.kernels, cfg.dtype, ctx.device))
        self.is_sparse = i in cfg.sparse_layers
        self.install(ctx, i, attention, attn_cfg, ffn)
        self.mixer.fusion = None

    def stages(self, positions_T: torch.Tensor, state: StreamState, input_ids_T: torch.Tensor | None,
               ctx: ForwardContext) -> Stages:
        x_TD, _ = state  # the flex_olmo stream: (x, None)
        h_TD = x_TD + self.post_attention_layernorm(self.mixer(positions_T, x_TD, ctx))
        y_TD = yield from ffn_stages(self.ffn, self.tp, h_TD, input_ids_T)
        return h_TD + self.post_feedforward_layernorm(y_TD), None

    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        plan: WeightPlan = {}
        for name in _NORMS:
            plan.update(getattr(self, name).weight_plan(f"{p}{name}.weight"))
        plan.update(self.mixer.weight_plan(f"{p}{self.mixer_name}."))
        plan.update(self.ffn.weight_plan(p, layer_idx, cfg, spec, expert_ids, names))
        return plan

    @staticmethod
    def capture(aux: AuxCapture, n: int, state: StreamState) -> None:
        aux.take(n, *state)


@HEAD.register("flex_olmo")
class FlexOlmoHead(PlainHead):
    """The final RMSNorm of the stream (no deferred add)."""

    def finish(self, state: StreamState) -> torch.Tensor:
        x_TD, _ = state
        return self.norm(x_TD)


__all__ = ["FlexOlmoHead", "FlexOlmoLayer"]
