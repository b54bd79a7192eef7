"""LongCat-Flash's residual kind, "shortcut_pair" (engine/models/blocks/registry.py imports this module): the
shortcut-connected MoE over two engine layers.

transformers' LongcatFlashDecoderLayer j is two sublayers, engine layers 2j and 2j + 1 here (each its own MLA and
its own cache, as transformers' cache indexes them):

    h = x + attn0(norm_in0(x));  y = norm_post0(h);  moe = experts(y);  h = h + mlp0(y)
    h = h + attn1(norm_in1(h));  y = norm_post1(h);  out = (h + mlp1(y)) + moe

The even layer's FFN kind is the routed experts (its layers are ModelConfig.sparse_layers), beside its own dense
MLP, which runs while the experts' all-to-all is in flight; the experts' output rides the residual stream to the
odd layer's end. The stream is PreNormLayer's (x, residual), the adds deferred into the next norm (the same sums:
addition commutes); between the two sublayers it also carries the pending experts' output, (x, residual, moe).
Checkpoint names: layer j's `input_layernorm.{k}`, `post_attention_layernorm.{k}`, `self_attn.{k}.*`, `mlps.{k}.*`
for sublayer k, and the experts and router under `mlp.`.

Legend: T tokens, D hidden.
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
from ..blocks.stream import RESIDUAL, Layer, prenorm
from ..layers import AuxCapture, DenseMLP, ForwardContext, RMSNorm


@RESIDUAL.register("shortcut_pair")
class ShortcutPairLayer(Layer):
    """Sublayer k = i % 2 of transformers' layer i // 2 (module docstring)."""

    def __init__(self, ctx: BuildContext, i: int, attention: AttentionKind, attn_cfg: Any,
                 ffn: Callable[[BuildContext, int], FFNBlock]):
        super().__init__(ctx)
        cfg = ctx.cfg
        self.pair, self.sub = divmod(i, 2)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.kernels, cfg.dtype, ctx.device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.kernels, cfg.dtype, ctx.device)
        self.install(ctx, i, attention, attn_cfg, ffn)
        if self.sub == 0:  # the routed experts are the FFN kind; the sublayer's dense MLP is this layer's own
            if self.moe is None:
                raise ValueError(f"layer {i}: LongCat-Flash's even layers hold the routed experts (sparse_layers).")
            self.dense = DenseMLP(cfg.hidden_size, cfg.intermediate_size, cfg.dtype, ctx.device, kernels=ctx.kernels,
                                  quant=cfg.quantization, prefix=f"model.layers.{self.pair}.mlps.0.", tp=ctx.tp)
        elif self.moe is not None:
            raise ValueError(f"layer {i}: LongCat-Flash's odd layers have a dense MLP only.")

    def stages(self, positions_T: torch.Tensor, state: Any, input_ids_T: torch.Tensor | None,
               ctx: ForwardContext) -> Stages:
        if self.sub == 0:
            h_TD, residual_TD = prenorm(self.input_layernorm, *state)
            h_TD = self.mixer(positions_T, h_TD, ctx)
            y_TD, residual_TD = self.post_attention_layernorm.add_forward(h_TD, residual_TD)
            routed = ffn_stages(self.ffn, self.tp, y_TD, input_ids_T)
            try:
                next(routed)  # router run, dispatch issued
            except StopIteration as done:  # no expert parallelism: nothing travels
                return self.dense(y_TD), residual_TD, done.value
            dense_TD = self.dense(y_TD)  # while the tokens travel
            yield
            moe_TD = yield from routed
            return dense_TD, residual_TD, moe_TD
        x_TD, residual_TD, moe_TD = state
        h_TD, residual_TD = self.input_layernorm.add_forward(x_TD, residual_TD)
        h_TD = self.mixer(positions_T, h_TD, ctx)
        y_TD, residual_TD = self.post_attention_layernorm.add_forward(h_TD, residual_TD)
        out_TD = yield from ffn_stages(self.ffn, self.tp, y_TD, input_ids_T)
        # transformers: residual + mlp1 + moe, left to right; the next norm adds the moe term last.
        return moe_TD, residual_TD + out_TD

    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        q, k = f"model.layers.{self.pair}.", self.sub
        plan: WeightPlan = {}
        plan.update(self.input_layernorm.weight_plan(f"{q}input_layernorm.{k}.weight"))
        plan.update(self.post_attention_layernorm.weight_plan(f"{q}post_attention_layernorm.{k}.weight"))
        plan.update(self.mixer.weight_plan(f"{q}{self.mixer_name}.{k}."))
        if k == 0:
            plan.update(self.dense.weight_plan(f"{q}mlps.0."))
            plan.update(self.ffn.weight_plan(q, layer_idx, cfg, spec, expert_ids, names))
        else:
            dense = self.ffn.modules["mlp"]  # the dense FFN kind's MLP, under its name here
            assert isinstance(dense, DenseMLP)
            plan.update(dense.weight_plan(f"{q}mlps.1."))
        return plan

    @staticmethod
    def capture(aux: AuxCapture, n: int, state: Any) -> None:
        aux.take(n, state[0], state[1])  # between a pair's sublayers the pending experts' output is not added yet


__all__ = ["ShortcutPairLayer"]
from . import mtp  # noqa: E402,F401  (registers the MTP layout "longcat")
