"""MTP layouts a family adds (architectures.Architecture.mtp_layout): the draft head of a family whose next-n
prediction layers are its own (DeepSeek-V4's `mtp.{i}.*` over its hyper-connection streams:
engine/models/deepseek_v4/mtp.py). The built-in layouts ("nextn", "qwen") are engine/spec/heads/'s;
engine/spec/heads/mtp.py asks this registry for any other."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Protocol

import torch
from torch import nn

from moelink.moe.layer import ExpertParallel

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ...tp.group import TensorParallel
from .registry import Registry


class BuildMTP(Protocol):
    """engine/spec/heads/mtp.make_mtp_layer's signature: MTP module i, its embedding and head the main model's."""

    def __call__(self, cfg: ModelConfig, spec: ArchSpec, i: int, kernels, device: torch.device,
                 ep: ExpertParallel | None = None, checkpoint_names: Collection[str] | None = None, *,
                 embed_tokens: torch.Tensor | None = None, lm_head: torch.Tensor | None = None,
                 tp: TensorParallel | None = None) -> nn.Module: ...


@dataclass(frozen=True)
class MTPLayout:
    """build: the module (compute_logits, moe_only_stages, weight_plan, layer_index, as the built-in heads);
    checkpoint_names(cfg, names): the tensors of `names` that are its (the main model leaves them unread)."""

    build: BuildMTP
    checkpoint_names: Callable[[ModelConfig, Collection[str]], list[str]]


MTP_LAYOUTS: Registry[MTPLayout] = Registry("mtp layout")

__all__ = ["MTP_LAYOUTS", "MTPLayout"]
