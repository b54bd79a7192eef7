"""Ling hybrid's next-n prediction (MTP) module as a speculative drafter (method "mtp"; MTP layout "ling").

transformers 5.24 declares the count (BailingHybridConfig.num_mtp_layers, saved as config.json's
num_nextn_predict_layers) and where the modules live: after the main decoder, `model.layers.{num_hidden_layers + i}.*`
(`_keys_to_ignore_on_load_unexpected`), but neither builds nor runs them. Their layout is the Bailing-V3 one that
vLLM's BailingMoeV3MTP reads (the same MLA + KDA hybrid), in Ling's published names (the "ling" checkpoint kind,
kinds.py: `attention.*`, `attention.dense`):
    enorm.weight, hnorm.weight [D], eh_proj.weight [D, 2D]
    input_layernorm, attention.* (one MLA with its per-head output gate, as a main full-attention layer),
    post_attention_layernorm, mlp.* (the routed experts with the correction bias and the shared expert)
    final_layernorm.weight [D]                  applied to the layer's output (not DeepSeek's shared_head.norm)
    shared_head.head.weight [V, D]              optional: the main lm_head where absent
and the main model's embedding. The module's output is final-normed and conditions the next chained draft
(engine/models/normed_mtp.py). It is a full-attention layer: it keeps no KDA state, and the main model's KDA states
are rolled back past rejected drafts as for any drafter. The drafter runs module 0 (the release ships one).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Collection

import torch
from torch import nn

from moelink.moe.layer import ExpertParallel

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ...tp.group import TensorParallel
from ..blocks.mtp import MTP_LAYOUTS, MTPLayout
from ..normed_mtp import MTPNames, NormedMTPLayer


def mtp_names(cfg: ModelConfig) -> MTPNames:
    """Module 0's names, under `model.layers.{num_hidden_layers}.`; the inner layer's as planned (the "ling"
    checkpoint kind publishes them)."""
    p = f"model.layers.{cfg.num_layers}."
    return MTPNames(enorm=p + "enorm.weight", hnorm=p + "hnorm.weight", eh_proj=p + "eh_proj.weight",
                    norm=p + "final_layernorm.weight", embed=None, head=p + "shared_head.head.weight",
                    publish=lambda name: name)


def ling_mtp_checkpoint_names(cfg: ModelConfig, names: Collection[str]) -> list[str]:
    """The tensors of `names` of the MTP modules (`model.layers.{num_hidden_layers + i}.*`): the drafter's only."""
    prefixes = tuple(f"model.layers.{cfg.num_layers + i}." for i in range(cfg.num_nextn_predict_layers))
    return sorted(n for n in names if prefixes and n.startswith(prefixes))


def _build(cfg: ModelConfig, spec: ArchSpec, i: int, kernels, device: torch.device, ep: ExpertParallel | None = None,
           checkpoint_names=None, *, embed_tokens: torch.Tensor | None = None, lm_head: torch.Tensor | None = None,
           tp: TensorParallel | None = None) -> nn.Module:
    """Module 0 (the drafter chains it; module docstring): MLA + the routed experts, as a main sparse MLA layer."""
    if i != 0:
        raise ValueError(f"MTP layer {i}: the drafter runs Ling hybrid's module 0 only.")
    layer_cfg = replace(cfg, sparse_layers=(cfg.num_layers,))
    return NormedMTPLayer(cfg, mtp_names(cfg), spec, layer_cfg, kernels, device, ep, checkpoint_names,
                          embed_tokens=embed_tokens, lm_head=lm_head, tp=tp)


MTP_LAYOUTS.add("ling", MTPLayout(_build, ling_mtp_checkpoint_names))

__all__ = ["ling_mtp_checkpoint_names", "mtp_names"]
