"""Embedding and head kinds: the ends of the residual stream. An embedding kind turns the embedded tokens [T, D]
into the stream's first state; a head kind ends the last state in the final-normed hidden states [T, D] and names
its checkpoint tensors. "plain" for both is every family's but DeepSeek-V4's (its hyper-connection streams:
"hc_streams" / "hc_head", engine/models/deepseek_v4/blocks.py). The embedding and LM head tables are the decoder's
(vocab-parallel under TP, engine/tp/vocab.py); the kinds say only what happens between them and the layers.

Legend: T tokens, D hidden.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from moelink.moe.weight_plan import WeightPlan

from ...config.model import ModelConfig
from ..layers import RMSNorm
from .context import BuildContext
from .registry import Registry

EMBEDDING: Registry[Callable[[ModelConfig, torch.Tensor], Any]] = Registry("embedding")
EMBEDDING.add("plain", lambda cfg, x_TD: (x_TD, None))  # PreNormLayer's (x, residual), no residual yet


class Head:
    """`modules`: what the decoder holds, by attribute name (model.norm, ...). `lm_head_name`: the LM head's
    checkpoint tensor (unless tied to the embedding)."""

    modules: dict[str, nn.Module]
    lm_head_name = "lm_head.weight"
    tieable = True  # config.json's tie_word_embeddings may share the embedding table

    def finish(self, state: Any) -> torch.Tensor:
        raise NotImplementedError

    def weight_plan(self) -> WeightPlan:
        raise NotImplementedError


HEAD: Registry[Callable[[BuildContext], Head]] = Registry("head")


@HEAD.register("plain")
class PlainHead(Head):
    """The final RMSNorm, the last layer's residual add fused into it."""

    def __init__(self, ctx: BuildContext):
        cfg = ctx.cfg
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.kernels, cfg.dtype, ctx.device)
        self.modules = {"norm": self.norm}

    def finish(self, state: Any) -> torch.Tensor:
        h_TD, _ = self.norm.add_forward(*state)
        return h_TD

    def weight_plan(self) -> WeightPlan:
        return self.norm.weight_plan("model.norm.weight")


__all__ = ["EMBEDDING", "HEAD", "Head"]
